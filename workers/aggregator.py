"""The aggregator worker process: ``python -m workers.aggregator ARGS`` is ``fedq aggregator ARGS``.

Its code is fedq/cli/aggregator.py; this file is what a deployment runs where the ``fedq`` script is not on
the PATH.
"""

from __future__ import annotations

import sys

from fedq.cli import main

if __name__ == "__main__":
    sys.exit(main(["aggregator", *sys.argv[1:]]))
