"""``python -m fedq ARGS`` is ``fedq ARGS``, for environments where the console script is not on the PATH."""

import sys

from fedq.cli import main

sys.exit(main())
