"""Entry point for `ray job submit --working-dir . -- python jobs/flow_routes.py --config <yaml>`.

Thin on purpose: parse arguments, then flowray.pipeline does the work. Inside `ray job submit`,
RAY_ADDRESS is set and the job joins the cluster; run directly, it starts an embedded local Ray.
"""

import sys

from flowray.cli import main

if __name__ == "__main__":
    sys.exit(main(["job", "run", *sys.argv[1:]]))
