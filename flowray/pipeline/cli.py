"""``flowray job ...`` subcommands (registered by flowray.cli; heavy imports happen in the handlers)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _config(args):
    from flowray.config import JobConfig, default_config_path

    path = Path(args.config)
    if not path.suffix and not path.exists():  # a shipped config by name: default, shared_data
        path = default_config_path(args.config)
    return JobConfig.from_yaml(path, overrides=args.set)


def cmd_run(args) -> int:
    from flowray.pipeline.job import run_job
    from flowray.run_report import SUMMARY

    config = _config(args)
    result = run_job(config, restart=args.restart)
    if args.show_summary:
        from flowray.pipeline.storage import Storage

        print("\n" + Storage(result.run_uri).read_bytes(SUMMARY).decode())
    print(run_listing(result.run_uri, result.manifest))
    return 0


def run_listing(run_uri: str, manifest: dict) -> str:
    """What a finished run wrote, the page to open last (the lines a terminal still shows at the end)."""
    from flowray.run_report import FIGURES, REPORT_HTML, SUMMARY

    c = manifest["counts"]
    return "\n".join([
        f"\nrun {manifest['run_name']}: {c['texts_in']} texts, {c['predictions_written']} predictions, "
        f"{c['error_rows']} error rows ({manifest['elapsed_s']} s)",
        f"  tables : {run_uri}/tables/",
        f"  figures: {', '.join(f'{run_uri}/{f}' for f in FIGURES)}",
        f"  summary: {run_uri}/{SUMMARY}",
        f"  report : {run_uri}/{REPORT_HTML}  <- open this page in a browser",
    ])


def cmd_validate(args) -> int:
    config = _config(args)
    print(f"config OK: {len(config.corpora)} corpora ({', '.join(c.domain for c in config.corpora)}), "
          f"content hash {config.content_hash()}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("job", help="the corpus job on Ray (embedded local Ray or a cluster)")
    sub = p.add_subparsers(dest="job_command", required=True)
    for name, handler, text in (("run", cmd_run, "run or resume a job"),
                                ("validate", cmd_validate, "check a job config without running it")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--config", default="default",
                       help="YAML job config, or a shipped one by name: default (embedded), shared_data")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a top-level config key, e.g. --set texts_per_domain=8 (repeatable)")
        if name == "run":
            q.add_argument("--show-summary", action="store_true", help="print summary.md at the end")
            q.add_argument("--restart", action="store_true",
                           help="discard what the run directory holds (another config's run, a run whose corpus "
                           "changed) and start it again, instead of resuming")
        q.set_defaults(handler=handler)
