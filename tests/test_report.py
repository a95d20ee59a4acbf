"""The run's report.html: one offline page with the summary, figures and tables."""

from __future__ import annotations

import re
import shutil

import polars as pl

from flowray.explorer.report import markdown_html, write_report
from flowray.pipeline.storage import Storage
from flowray.tables import Accumulator
from test_pipeline import _rows


def _tables():
    acc = Accumulator(1, 2, (0.03,), general_domain="gen")
    acc.update(_rows("gen", 8, prev=[0.9, 0.1], same=[0.9, 0.9], first=False, comps=[0.2, 0.01, 0.5], heads=[0]))
    acc.update(_rows("code", 5, prev=[0.9, 0.1], same=[0.9, 0.9], first=False, comps=[0.2, 0.3, 0.5], heads=[1]))
    return acc.tables()


def test_report_holds_summary_figures_and_tables_offline(tmp_path):
    import io

    import matplotlib

    matplotlib.use("Agg")
    from flowray.plots import activation_map, domain_comparison

    st = Storage(str(tmp_path / "run"))
    t = _tables()
    figs = []
    for name, fig in (("activation_map", activation_map(t["head_activation"], t["ffn_activation"],
                                                        t["component_importance"], t["head_roles"], domain="gen",
                                                        tau=0.03, n_layers=1, n_heads=2)),
                      ("domain_comparison", domain_comparison(t["component_importance"], t["domain_specialisation"],
                                                              general="gen", n_layers=1, n_heads=2))):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        st.write_bytes(f"figures/{name}.png", buf.getvalue())
        figs.append(f"figures/{name}.png")
    summary = "# flowray run `t`\n\n| domain | texts |\n|---|---:|\n| gen | 8 |\n\n## Head roles\n\n- previous-token heads: L0H0\n"
    link = write_report(st, t, summary, figs, title="flowray run t")
    assert "[report.html](report.html)" in link
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?:", page)
    for section in ("summary", "activation", "roles", "domains"):
        assert f"id='{section}'" in page
    assert "<td>previous_token</td>" in page  # the head roles table
    spec = t["domain_specialisation"].filter(pl.col("specialised"))
    assert spec.height and "<td>code</td>" in page


def test_summary_markdown_becomes_html():
    out = markdown_html("# T\n\n| a | b |\n|---|---:|\n| 1 | `x` |\n\n- one\n- two\n\nplain <b>")
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><code>x</code></td></tr></table>" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out and "<p>plain &lt;b&gt;</p>" in out


def test_nested_lists_become_nested_html_lists():
    """As the summary writes them: a list, a paragraph, then an indented list (the pruned-silence heads)."""
    md = ("- previous-token heads: L2H1\n- subword-merging heads: none\n\nWith silence after pruning instead:\n"
          "  - tau = 0.01: L3H2, L1H0\n  - tau = 0.04: none\n\n- a\n  - a.1\n    - a.1.i\n  - a.2\n- b\n")
    out = markdown_html(md)
    assert "<ul><li>previous-token heads: L2H1</li><li>subword-merging heads: none</li></ul>" in out
    assert "<ul><li>tau = 0.01: L3H2, L1H0</li><li>tau = 0.04: none</li></ul>" in out
    assert "<ul><li>a<ul><li>a.1<ul><li>a.1.i</li></ul></li><li>a.2</li></ul></li><li>b</li></ul>" in out
    assert "- " not in out  # no item left as literal text


def _finished_run(tmp_path) -> Storage:
    """A run as the job leaves it: shards committed, reduced (tables + manifest), then its report written."""
    from test_reduce import _commit, _config, _plan

    from flowray.pipeline.reduce import reduce_run
    from flowray.run_report import write_report

    storage, index = Storage(str(tmp_path / "run")), _plan()
    for shard in index["shards"]:
        _commit(storage, shard)
    reduce_run(_config(), storage, index, started=0.0)
    write_report(storage)  # what run_job does right after the reduce
    return storage


def test_flowray_report_renders_a_finished_run_again_identically(tmp_path, capsys):
    from flowray.cli import main
    from flowray.run_report import REPORT_FILES

    run = tmp_path / "run"
    _finished_run(tmp_path)
    written = {rel: (run / rel).read_bytes() for rel in REPORT_FILES}
    for rel in REPORT_FILES:
        (run / rel).unlink()
    for computed in ("predictions", "errors", "done"):  # nothing is recomputed: only the tables are read
        shutil.rmtree(run / computed)
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    for rel in REPORT_FILES:
        assert (run / rel).read_bytes() == written[rel], f"{rel} differs from the job's"
    assert {p for p in run.rglob("*") if p.is_file()} - set(kept) == {run / rel for rel in REPORT_FILES}
    assert all(p.read_bytes() == data for p, data in kept.items()), "the tables and the manifest stay as they were"


def test_flowray_report_of_an_unfinished_run_is_one_clear_line(tmp_path, capsys):
    from flowray.cli import main

    storage = _finished_run(tmp_path)
    run = tmp_path / "run"
    (run / "tables" / "head_roles.parquet").unlink()
    assert main(["report", str(run)]) == 2
    assert "the table tables/head_roles.parquet that its manifest lists is missing" in capsys.readouterr().err
    (run / "manifest.json").write_text('{"run_name": "r"')
    assert main(["report", str(run)]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err
    storage.delete("manifest.json")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no manifest.json: it is not a finished flowray run" in err
