"""Routes vs activation patching vs attention knockout vs attribution patching (EAP) on IOI, side by side in one run.

    python bench/compare_baselines.py --n 50 --out out/compare-n50   # ~15 min on 2 CPU cores
    python bench/compare_baselines.py --n 8 --out /tmp/compare            # a quick look

Prints the times, the ratios and the agreement; writes report.md, summary.json and figures to --out.
All options: flowray.cli.add_compare_arguments (the same as `flowray compare`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from flowray.baselines import print_summary
from flowray.cli import add_compare_arguments, run_compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compare_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    command = "python bench/compare_baselines.py " + " ".join(shlex.quote(a) for a in argv)
    summary = run_compare(args, command=command.strip())
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
