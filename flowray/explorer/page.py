"""Assemble the explorer's single HTML file: template + inline CSS + inline JS + the data as inline JSON.

No library: ~550 lines of our own JavaScript (``route.js``: the data and extract_route; ``explorer.js``: the
view, a canvas for the route and SVG for labels). The view is lines, squares and dots on a grid; a bundled
d3 or plotly.js would add 0.3-3.5 MB per page, a licence to ship and an API between the data and the
drawing, and buy nothing here (no zoomable axes, no transitions). The page makes no network request: everything, data included, is in the file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from flowray.errors import InputError
from flowray.explorer.data import PromptView, encode_page


def _asset(name: str) -> str:
    return resources.files("flowray.explorer").joinpath("assets", name).read_text(encoding="utf-8")


def _inline_json(data: dict) -> str:
    # "<" never appears raw, so no "</script>" or "<!--" in a token can end the data block early
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def explorer_html(views: list[PromptView], *, compare: bool = False, tau: float = 0.04, title: str = "") -> str:
    """The page as a string (see ``write_explorer``)."""
    data = encode_page(views, compare=compare, tau=tau, title=title)
    page = _asset("explorer.html")
    for marker, text in (("/*FLOWRAY_CSS*/", _asset("explorer.css")), ("/*FLOWRAY_JS*/", _asset("route.js") + "\n" + _asset("explorer.js")),
                         ("FLOWRAY_TITLE", _title(data)), ("FLOWRAY_DATA", _inline_json(data))):
        if marker not in page:  # pragma: no cover - guards the packaged template
            raise RuntimeError(f"explorer template lacks its {marker} marker")
        page = page.replace(marker, text, 2 if marker == "FLOWRAY_TITLE" else 1)  # <title> and <h1>
    return page


def _title(data: dict) -> str:
    import html

    p = data["prompts"][0]
    text = data["title"] or f"flowray explorer: {p['model'] or 'model'}"
    return html.escape(text)


def write_explorer(views: list[PromptView], path: str | Path, *, compare: bool = False, tau: float = 0.04,
                   title: str = "") -> Path:
    """Write the self-contained page to ``path`` (must end in .html)."""
    path = Path(path)
    check_html_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(explorer_html(views, compare=compare, tau=tau, title=title), encoding="utf-8")
    return path


def check_html_path(path: Path) -> None:
    if path.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out must end in .html (one self-contained page); got {str(path)!r}")
