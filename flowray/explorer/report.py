"""A job run's ``report.html``: summary, activation map, head roles and domain comparison in one offline page.

Static: the run's figures go in as base64 PNGs, the tables as HTML tables; no script and no request.
Only polars and the standard library are needed (``flowray.run_report`` calls it; no torch, no browser).
"""

from __future__ import annotations

import base64
import html
import re

REPORT = "report.html"
_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:20px auto;padding:0 16px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:26px;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}nav a{margin-right:12px}"""


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


_ITEM = re.compile(r"^( *)- (.*)$")


def _list_html(items: list[tuple[int, str]]) -> str:
    """``(indent, text)`` list items -> nested ``<ul>``: an item indented deeper than the one before it opens a
    list inside that item; a shallower one closes lists until its own level."""
    out, levels = [], []  # levels: the indents of the open lists, outermost first
    for indent, text in items:
        if not levels or indent > levels[-1]:
            out.append("<ul>")  # the previous <li>, if any, stays open around it
            levels.append(indent)
        else:
            out.append("</li>")
            while len(levels) > 1 and indent < levels[-1]:
                levels.pop()
                out.append("</ul></li>")
        out.append(f"<li>{_inline(text)}")
    out.append("</li>")
    while levels:
        levels.pop()
        out.append("</ul></li>" if levels else "</ul>")
    return "".join(out)


def markdown_html(md: str) -> str:
    """The subset of Markdown the summary uses: headings, paragraphs, '-' lists (nested by indent), pipe tables."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)  # the page's own h1 is the title
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            body = "".join("<tr>" + "".join(f"<{'th' if r == 0 else 'td'}>{_inline(c)}</{'th' if r == 0 else 'td'}>"
                                             for c in row) + "</tr>" for r, row in enumerate(rows))
            out.append(f"<table>{body}</table>")
            continue
        elif _ITEM.match(line):
            items = []
            while i < len(lines) and (m := _ITEM.match(lines[i])):
                items.append((len(m.group(1)), m.group(2)))
                i += 1
            out.append(_list_html(items))
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _table(df, columns: list[str], limit: int = 60) -> str:
    if df is None or not df.height:
        return "<p>none</p>"
    cols = [c for c in columns if c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for row in df.head(limit).iter_rows(named=True):
        cells = []
        for c in cols:
            v = row[c]
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            text = f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))
            cells.append(f"<td class='n'>{text}</td>" if num else f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>(first {limit} of {df.height} rows; all in the Parquet table)</p>" if df.height > limit else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


def _figure(storage, rel: str) -> str:
    data = base64.b64encode(storage.read_bytes(rel)).decode("ascii")
    return f"<figure><img alt='{html.escape(rel)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(rel)}</figcaption></figure>"


def _without_title(md: str) -> str:
    """The summary's own '# title' line repeats the page's title."""
    first, _, rest = md.partition("\n")
    return rest if first.startswith("# ") else md


def report_html(storage, tables: dict, summary: str, figures: list[str], *, title: str = "flowray run") -> str:
    import polars as pl

    roles = tables.get("head_roles")
    if roles is not None and roles.height:
        roles = roles.filter(pl.col("role").is_not_null()).sort("domain", "layer", "head")
    spec = tables.get("domain_specialisation")
    if spec is not None and spec.height:
        spec = spec.filter(pl.col("specialised")).sort(["domain", "ratio"], descending=[False, True])
    figs = {rel.rsplit("/", 1)[-1].removesuffix(".png"): rel for rel in figures}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<nav><a href='#summary'>summary</a><a href='#activation'>activation map</a><a href='#roles'>head roles</a>"
             "<a href='#domains'>domain comparison</a></nav>",
             "<section id='summary'>", markdown_html(_without_title(summary)), "</section>",
             "<section id='activation'><h2>Activation map (paper figure 9a)</h2>",
             _figure(storage, figs["activation_map"]) if "activation_map" in figs else "<p>no figure</p>", "</section>",
             "<section id='roles'><h2>Head roles (paper section 4.3)</h2>",
             _table(roles, ["domain", "layer", "head", "role", "previous_token_fraction", "subword_merging_fraction",
                            "first_subword_silent_fraction"]), "</section>",
             "<section id='domains'><h2>Domain comparison (paper figure 10)</h2>",
             _figure(storage, figs["domain_comparison"]) if "domain_comparison" in figs else "<p>no figure</p>",
             "<h3>Domain-specialised heads</h3>",
             _table(spec, ["domain", "layer", "head", "importance", "general_importance", "ratio", "rank_in_domain"]),
             "<h3>Texts and predictions per domain</h3>",
             _table(tables.get("domain_summary"), ["domain", "texts", "predictions", "target_predictions"]),
             "</section></body></html>"]
    return "\n".join(parts)


def write_report(storage, tables: dict, summary: str, figures: list[str], *, title: str = "flowray run") -> str:
    """Write ``report.html`` into the run and return the Markdown line that links it (for ``summary.md``)."""
    storage.write_text(REPORT, report_html(storage, tables, summary, figures, title=title))
    return f"\nOne-page offline report (summary, activation map, head roles, domain comparison): [{REPORT}]({REPORT})\n"
