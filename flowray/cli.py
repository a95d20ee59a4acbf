"""The ``flowray`` command: argument parsing and logging setup only; the work happens in the library.

Bad input (FlowrayError) prints one clear line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from flowray.baselines.options import ABLATION_MODES, DEFAULT_KS
from flowray.cli_common import (add_model_args, add_text_args, check_texts, load_model_from_args, progress,
                                texts_from_args)
from flowray.cli_types import ArgumentParser, positive_int, positive_ints, tau_arg
from flowray.errors import FlowrayError, InputError, Terminated
from flowray.explorer.cli import register_cli as register_explore
from flowray.pipeline.cli import register_cli as register_job
from flowray.signals import raise_on_sigterm
from flowray.tasks import IOI_TEMPLATE_SETS
from flowray.threads import prefer_short_spin

log = logging.getLogger("flowray")


# --- shared by route and importances ---------------------------------------------------------------
def _check_outputs(args, many: bool, *, out_suffixes: tuple[str, ...], plot: bool) -> None:
    """--out (and --plot) can be written: checked before the model load, so no computation is lost."""
    from flowray.io_checks import check_output_dir, check_output_file

    if many:
        check_output_dir(args.out, "--out")
    else:
        check_output_file(args.out, "--out", suffixes=out_suffixes)
    if plot and args.plot is not None:
        if many:
            check_output_dir(args.plot, "--plot")
        else:
            check_output_file(args.plot, "--plot", suffixes=(".png", ".svg"))


class _Failures:
    """--file: a text that cannot be processed gets NNNNN.error.json; the rest go on; a summary at the end."""

    def __init__(self, out_dir: Path | None):
        self.out_dir, self.count = out_dir, 0

    def usable(self, i: int, text: str) -> bool:
        if self.out_dir is not None:
            (self.out_dir / f"{i:05d}.error.json").unlink(missing_ok=True)  # from an earlier run
        if text.strip():
            return True
        self.record(i, text, InputError("text is empty or only whitespace"))
        return False

    def record(self, i: int, text: str, exc: Exception) -> None:
        self.count += 1
        path = self.out_dir / f"{i:05d}.error.json"
        path.write_text(json.dumps({"text_index": i, "text": text[:200], "error_type": type(exc).__name__,
                                    "error": str(exc)}, indent=1))
        log.error("text %d: %s (recorded in %s)", i, exc, path)

    def close(self, total: int) -> int:
        """Exit status: 0 when every text went through, 1 when some failed (each has its error record)."""
        if not self.count:
            return 0
        print(f"flowray: {self.count} of {total} texts failed; see {self.out_dir}/NNNNN.error.json", file=sys.stderr)
        return 1


def _importances_for(lm, text: str, args):
    from flowray.api import edge_importances, encode_text

    ids = encode_text(lm.tokenizer, text, max_tokens=args.max_tokens, context=lm.adapter.shape.max_positions,
                      prepend_bos=args.prepend_bos)
    return edge_importances(lm, ids, chunk_size=args.chunk_size, backend=args.backend)


# --- flowray route --------------------------------------------------------------------------------
def cmd_route(args) -> int:
    from flowray.plots import plot_route, save_figure
    from flowray.routes import check_position, extract_route

    texts = texts_from_args(args)
    many = args.file is not None
    check_texts(texts, many)
    _check_outputs(args, many, out_suffixes=(), plot=True)  # before the model load and the computation
    lm = load_model_from_args(args)
    out_dir = args.out if many else None
    failures = _Failures(out_dir)
    for i, text in enumerate(progress(texts, len(texts), "routes")):
        if not failures.usable(i, text):
            continue
        try:
            imp = _importances_for(lm, text, args)
            pos = check_position(args.position, imp.n_tokens)
        except FlowrayError as exc:
            if not many:
                raise
            failures.record(i, text, exc)
            continue
        route = extract_route(imp, tau=args.tau, position=pos, model=lm.name)
        predicted = int(imp.predicted_ids[pos])
        route = _with_prediction(route, predicted, lm.tokenizer.decode([predicted]))
        json_path = (out_dir / f"{i:05d}.json") if many else args.out
        route.save(json_path)
        plot_path = None
        if args.plot is not None:
            plot_path = args.plot / f"{i:05d}.{args.plot_format}" if many else args.plot
            fig = plot_route(route)
            save_figure(fig, plot_path)
            import matplotlib.pyplot as plt

            plt.close(fig)
        if not many:
            heads = sorted(route.heads())
            print(f"position {pos} ({route.tokens[pos]!r}) predicts {route.prediction['token']!r}; "
                  f"route at tau={args.tau:g}: {len(route.nodes)} nodes, {len(route.edges)} edges, "
                  f"{len(heads)} heads")
            print(f"route JSON: {json_path}" + (f"\nfigure: {plot_path}" if plot_path else ""))
    if many:
        print(f"{len(texts) - failures.count} routes in {out_dir}" + (f", figures in {args.plot}" if args.plot else ""))
    return failures.close(len(texts))


def _with_prediction(route, token_id: int, token: str):
    from dataclasses import replace

    return replace(route, prediction={"token_id": token_id, "token": token})


# --- flowray importances --------------------------------------------------------------------------
def cmd_importances(args) -> int:
    texts = texts_from_args(args)
    many = args.file is not None
    check_texts(texts, many)
    _check_outputs(args, many, out_suffixes=(".npz",), plot=False)  # before the model load
    lm = load_model_from_args(args)
    failures = _Failures(args.out if many else None)
    for i, text in enumerate(progress(texts, len(texts), "importances")):
        if not failures.usable(i, text):
            continue
        try:
            imp = _importances_for(lm, text, args)
        except FlowrayError as exc:
            if not many:
                raise
            failures.record(i, text, exc)
            continue
        path = args.out / f"{i:05d}.npz" if many else args.out
        imp.save(path)
        if not many:
            print(f"{imp.n_tokens} tokens, {imp.n_layers} layers x {imp.n_heads} heads -> {path}")
    if many:
        print(f"{len(texts) - failures.count} importance files in {args.out}")
    return failures.close(len(texts))


# --- flowray compare --------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """The comparison's options (shared by ``flowray compare`` and ``bench/compare_baselines.py``)."""
    p.add_argument("--model", default="smollm2", help="model spec (default: the packaged SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--n", type=positive_int, default=50, help="IOI prompts (default 50, as in the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--templates", choices=list(IOI_TEMPLATE_SETS), default="both")
    p.add_argument("--tau", type=tau_arg, default=0.03, help="route threshold (default 0.03, paper figure 6)")
    p.add_argument("--ks", type=positive_ints, default=DEFAULT_KS,
                   help="heads to ablate, comma-separated (default " + ",".join(map(str, DEFAULT_KS)) + ")")
    p.add_argument("--random-draws", type=positive_int, default=5, help="random head sets per k (default 5)")
    p.add_argument("--top", type=positive_int, default=10, help="head top-k for the overlap (default 10)")
    p.add_argument("--pair-k", type=positive_int, default=5, help="token-pair top-k per prompt (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="rows per forward pass in the sweeps (default 128)")
    p.add_argument("--route-batch", type=positive_int, default=25,
                   help="at most this many prompts per batched statistics call (the headline routes timing), "
                        "and per interleaved measurement chunk (default 25)")
    p.add_argument("--ablation", choices=list(ABLATION_MODES), default="mean")
    p.add_argument("--out", type=Path, default=Path("compare-out"),
                   help="output directory: report.md, summary.json, figures (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_compare(args, command: str | None = None) -> dict:
    """``flowray.baselines.run_comparison`` with the options of ``add_compare_arguments``; returns its summary."""
    from flowray.baselines.run import run_comparison

    return run_comparison(
        model=args.model, n=args.n, seed=args.seed, out_dir=args.out, tau=args.tau, ks=args.ks,
        random_draws=args.random_draws, progress=not args.no_progress, top=args.top, pair_k=args.pair_k,
        batch_size=args.batch_size, route_batch=args.route_batch, ablation=args.ablation,
        templates=args.templates, device=args.device,
        command=command,
    )


def cmd_compare(args) -> int:
    from flowray.baselines.report import print_summary

    command = "flowray " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    print_summary(run_compare(args, command=command))
    return 0


def register_compare(subparsers) -> argparse.ArgumentParser:
    """Add ``flowray compare`` to the CLI's subparsers (handler returns an exit code)."""
    p = subparsers.add_parser(
        "compare",
        help="time and compare routes with activation patching, attention knockout and attribution patching "
             "on IOI (writes report.md)",
    )
    add_compare_arguments(p)
    p.set_defaults(handler=cmd_compare)
    return p


# --- flowray report -------------------------------------------------------------------------------
def cmd_report(args) -> int:
    from flowray.pipeline.storage import Storage
    from flowray.run_report import write_report

    storage = Storage(args.run_dir)
    written = write_report(storage)
    print(f"report of {storage.uri} rendered from its tables: {', '.join(written)}")
    return 0


def register_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="render a finished job run's summary.md, figures and report.html again from its tables "
                       "(nothing is recomputed)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (<output>/<run_name>), a path or a bucket URI")
    p.set_defaults(handler=cmd_report)


# --- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="flowray", description="Information flow routes for HF causal LMs (Ferrando & Voita, 2024)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("route", help="extract the information flow route of one prediction (JSON + figure)")
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--tau", type=tau_arg, default=0.04, help="edge importance threshold in (0, 1) (default 0.04)")
    p.add_argument("--position", type=int, default=-1, help="prediction position (default -1: the last token)")
    p.add_argument("--out", type=Path, required=True,
                   help="route JSON file (with --file: a directory, one NNNNN.json per text)")
    p.add_argument("--plot", type=Path, default=None,
                   help="figure .png/.svg (with --file: a directory, one NNNNN.<format> per text)")
    p.add_argument("--plot-format", choices=["png", "svg"], default="png", help="figure format with --file")
    p.set_defaults(handler=cmd_route)

    p = sub.add_parser("importances", help="write every edge importance of a text (.npz arrays)")
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--out", type=Path, required=True, help=".npz file (with --file: a directory of NNNNN.npz)")
    p.set_defaults(handler=cmd_importances)

    register_job(sub)
    register_report(sub)
    register_compare(sub)
    register_explore(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_short_spin()  # before any command loads torch: flowray.threads says why
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    raise_on_sigterm()  # a SIGTERM (kill, a scheduler) ends like Ctrl-C: cleanup runs, one line, status 143
    try:
        return int(args.handler(args) or 0)
    except FlowrayError as exc:
        print(f"flowray: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("flowray: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("flowray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
