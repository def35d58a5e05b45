"""python -m ep.bench (see ep.bench.cli)."""
from .cli import main

raise SystemExit(main())
