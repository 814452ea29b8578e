"""End-to-end loader benchmark (same as `shardkit bench`); see shardkit/bench.py.

python tools/bench.py --count 2000 --workers 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
