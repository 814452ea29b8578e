"""``python -m shardkit.cli``: the same as the ``shardkit`` console script."""

from .main import main

raise SystemExit(main())
