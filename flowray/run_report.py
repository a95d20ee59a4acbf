"""A finished job run's report, made from its tables alone: ``summary.md``, the figures and ``report.html``.

The reduce writes the tables and the manifest; the job then calls ``write_report`` on the run, and
``flowray report RUN_DIR`` calls it again to re-render a finished run's report (after a change to the
report or the figures) from the same files, without computing anything. Both read only what the run
directory holds, so both write the same bytes. No Ray and no model here: polars, matplotlib and the page
of ``flowray.explorer.report``.

``storage`` is the run directory as ``flowray.pipeline.storage.Storage`` gives it (a local path or a bucket).
"""

from __future__ import annotations

import io

from flowray.errors import InputError
from flowray.tables import tau_columns

SUMMARY = "summary.md"
FIGURES = ("figures/activation_map.png", "figures/domain_comparison.png")
REPORT_HTML = "report.html"
REPORT_FILES = (SUMMARY, *FIGURES, REPORT_HTML)  # everything write_report writes, derived from the tables
_MANIFEST = "manifest.json"  # written last by the reduce: a run without it is not finished


def write_report(storage) -> tuple[str, ...]:
    """Render the report of the finished run in ``storage`` and write ``REPORT_FILES`` (paths in the run)."""
    from flowray.explorer.report import write_report as write_page

    run = _read_run(storage)
    _write_figures(storage, run)
    summary = _summary_markdown(run)
    summary += write_page(storage, run.tables, summary, list(FIGURES), title=f"flowray run {run.config['run_name']}")
    storage.write_text(SUMMARY, summary)
    return REPORT_FILES


class _Run:
    """What the report reads: the manifest (with the run's config) and the reduce's tables."""

    def __init__(self, manifest: dict, tables: dict):
        self.manifest, self.tables = manifest, tables
        self.config = manifest["config"]
        self.n_layers, self.n_heads = manifest["model"]["n_layers"], manifest["model"]["n_heads"]
        # runs reduced before the manifest named it: the config's, else the first corpus (JobConfig.general)
        self.general = (manifest.get("general_domain") or self.config.get("general_domain")
                        or self.config["corpora"][0]["domain"])
        self.taus = [float(t) for t in self.config["tau"]]


def _read_run(storage) -> _Run:
    import polars as pl

    if not storage.exists(_MANIFEST):
        raise InputError(f"{storage.uri!r} holds no {_MANIFEST}: it is not a finished flowray run (the job writes "
                         f"the manifest last); give the directory of a finished run, or finish this one with "
                         f"`flowray job run` and its config")
    try:
        manifest = storage.read_json(_MANIFEST)
    except ValueError as exc:
        raise InputError(f"{storage.uri!r}: {_MANIFEST} is not valid JSON ({exc}); re-run the job with its config "
                         "to write it again") from None
    missing = [key for key in ("config", "model", "tables") if key not in manifest]
    if missing:
        raise InputError(f"{storage.uri!r}: {_MANIFEST} has no {', '.join(missing)}; expected a flowray run's "
                         "manifest; re-run the job with its config to write it again")
    tables = {}
    for name, rel in manifest["tables"].items():
        if not storage.exists(rel):
            raise InputError(f"{storage.uri!r}: the table {rel} that its manifest lists is missing; re-run the "
                             "job with its config to write it again")
        tables[name] = pl.read_parquet(io.BytesIO(storage.read_bytes(rel)))
    return _Run(manifest, tables)


def _write_figures(storage, run: _Run) -> None:
    from flowray.plots import activation_map, domain_comparison, pyplot

    plt = pyplot()
    t = run.tables
    L, H = run.n_layers, run.n_heads
    for rel, fig in zip(FIGURES, (
        activation_map(t["head_activation"], t["ffn_activation"], t["component_importance"], t["head_roles"],
                       domain=run.general, tau=min(run.taus), n_layers=L, n_heads=H),
        domain_comparison(t["component_importance"], t["domain_specialisation"], general=run.general,
                          n_layers=L, n_heads=H),
    ), strict=True):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        storage.write_bytes(rel, buf.getvalue())


def _fmt_heads(rows) -> str:
    return ", ".join(f"L{r['layer']}H{r['head']}" for r in rows) or "none"


def _summary_markdown(run: _Run) -> str:
    """``summary.md`` without its last line (the link to ``report.html``)."""
    import polars as pl

    cfg, t, m = run.config, run.tables, run.manifest
    bos = m.get("bos")
    start = (f"Position 0 of every text is `{bos['token']}` ({bos['source']}); its own prediction is not a row."
             if bos else "No BOS was prepended (prepend_bos: false): idle heads park on each text's first token.")
    lines = [f"# flowray run `{cfg['run_name']}`", "",
             f"Model `{cfg['model']}`, tau {', '.join(f'{tau:g}' for tau in run.taus)}, up to "
             f"{cfg['max_tokens']} tokens per text; general domain: `{run.general}`. {start}", "",
             "| domain | texts | predictions | target predictions | error rows |", "|---|---:|---:|---:|---:|"]
    errors = t["errors"]
    err_counts = errors.group_by("domain").len() if errors.height else None
    for row in t["domain_summary"].iter_rows(named=True):
        n_err = 0
        if err_counts is not None:
            match = err_counts.filter(pl.col("domain") == row["domain"])
            n_err = match["len"][0] if match.height else 0
        lines.append(f"| {row['domain']} | {row['texts']} | {row['predictions']} | {row['target_predictions']} "
                     f"| {n_err} |")
    for domain in m.get("domains_without_predictions", []):  # absent from the tables: say so rather than leave it out
        n_err = int(err_counts.filter(pl.col("domain") == domain)["len"].sum()) if err_counts is not None else 0
        lines.append(f"| {domain} | {n_err} | 0 | 0 | {n_err} (every text failed: see tables/errors.parquet) |")
    lines += _roles_lines(run)
    lines += _activation_lines(run)
    if not m.get("pos_tagging", True):
        lines += ["", "POS tags were not available (NLTK tagger data not found): `pos`/`next_pos` are null."]
    lines += ["", "Tables: `tables/*.parquet`; figures: `figures/*.png`; per-prediction rows: `predictions/`."]
    return "\n".join(lines) + "\n"


def _roles_lines(run: _Run) -> list[str]:
    import polars as pl

    roles = run.tables["head_roles"].filter(pl.col("domain") == run.general)

    def heads(role: str) -> str:
        return _fmt_heads(roles.filter(pl.col("role") == role).iter_rows(named=True))

    lines = ["", f"## Head roles in `{run.general}` (paper section 4.3)", "",
             f"- previous-token heads: {heads('previous_token')}",
             f"- subword-merging heads: {heads('subword_merging')}",
             "", "Silence on first subwords is judged on raw importances (at most 0.005%): after pruning at tau a "
             "head's renormalised importance is either 0 or above tau, so the paper's threshold only has a meaning "
             "before pruning. With silence after pruning instead:"]
    for tau in run.taus:
        pruned = roles.filter(pl.col(tau_columns(tau).subword_merging_pruned))
        lines.append(f"  - tau = {tau:g}: {_fmt_heads(pruned.iter_rows(named=True))}")
    return lines


def _activation_lines(run: _Run) -> list[str]:
    import polars as pl

    t = run.tables
    tau = max(run.taus)  # the most selective threshold separates heads best
    act = t["head_activation"].filter(pl.col("tau") == tau).join(
        t["component_importance"].filter(pl.col("component") == "head").select("domain", "layer", "head", "importance"),
        on=["domain", "layer", "head"], how="left")
    lines = ["", f"## Most frequently activated heads (tau = {tau:g}; ties broken by mean importance)", ""]
    for domain in t["domain_summary"]["domain"]:
        top = act.filter(pl.col("domain") == domain).sort(["frequency", "importance"], descending=True).head(5)
        lines.append(f"- `{domain}`: " + ", ".join(f"L{r['layer']}H{r['head']} ({r['frequency']:.2f})"
                                                  for r in top.iter_rows(named=True)))
    spec = t["domain_specialisation"].filter(pl.col("specialised"))
    lines += ["", f"## Domain-specialised heads (vs `{run.general}`)", ""]
    for domain in sorted(set(spec["domain"].to_list())):
        rows = spec.filter(pl.col("domain") == domain).sort("ratio", descending=True).head(6)
        lines.append(f"- `{domain}`: " + ", ".join(f"L{r['layer']}H{r['head']} (x{r['ratio']:.1f})"
                                                  for r in rows.iter_rows(named=True)))
    if not spec.height:
        lines.append("- none passed the criterion")
    return lines
