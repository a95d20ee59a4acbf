"""Tiny random models with a word-level tokenizer trained on the fly, and a headless Chromium for page tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny_models import VOCAB, tiny_model

WORDS = ["[UNK]"] + ("When Mary and John went to the store , gave a drink cat sat on mat dog ran home Tom Anna "
                     "book read wrote letter big small red blue green one two three four five six seven eight "
                     "nine ten is was are were he she it they we you I me him her them this that these those "
                     "day night sun moon tree house car road city town river sea sky cloud rain snow wind fire "
                     "water earth stone gold iron glass paper bread milk tea coffee apple pear plum lime salt king queen").split() + ["<|endoftext|>"]  # the document separator: the BOS
assert len(WORDS) == VOCAB, len(WORDS)
IOI = "When Mary and John went to the store , John gave a drink to"
ABC = "When Mary and John went to the store , Tom gave a drink to"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|endoftext|>")


def tiny_loaded(case: str = "llama-gqa", seed: int = 0):
    from flowray.models.families import adapter_for
    from flowray.models.loading import LoadedModel

    model = tiny_model(case, seed=seed)
    return LoadedModel(model, word_tokenizer(), adapter_for(model), f"tiny-{case}")


def save_tiny(path: Path, case: str = "llama-gqa") -> Path:
    lm = tiny_loaded(case)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (Debian's) driven by playwright; skips with the reason when either is missing."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: the browser tests need Debian's `chromium` (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """An opened explorer page with what it printed and requested."""

    def __init__(self, browser, path: Path, width: int = 1400, height: int = 1000):
        self.console, self.requests = [], []
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = Path(path).resolve().as_uri()
        self.page.goto(self.url)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def close(self):
        self.page.close()
