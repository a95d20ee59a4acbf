"""Regenerate docs/explorer.png: SmolLM2 on the IOI prompt, the explorer opened on a node's logit lens.

    python docs/explorer_screenshot.py        # needs the packaged SmolLM2, playwright and Debian's chromium
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import flowray

IOI = "When Mary and John went to the store, John gave a drink to"


def main(out: Path = Path(__file__).resolve().parent / "explorer.png") -> Path:
    from playwright.sync_api import sync_playwright

    page_path = Path(tempfile.mkdtemp()) / "ioi.html"
    lm = flowray.load_model("smollm2", device="cpu")
    last = flowray.encode_text(lm.tokenizer, IOI).shape[1] - 1  # the BOS is position 0
    flowray.explore(lm, IOI, page_path, tau=0.04)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 980})
        page.goto(page_path.as_uri())
        # the attention node of layer 23 at the last token: where the name mover heads bring " Mary"
        key = page.evaluate(f"flowray.nodeKey(0, 23, {last}, 'attn')")
        page.mouse.click(*page.evaluate(f"flowray.where(0, {{node: {key}}})"))
        page.mouse.move(2, 2)  # no tooltip in the picture
        page.screenshot(path=str(out), full_page=False)
        browser.close()
    return out


if __name__ == "__main__":
    print(main(*(Path(a) for a in sys.argv[1:])))
