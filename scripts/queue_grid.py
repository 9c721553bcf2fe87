"""The ablation grid on DVC's experiment queue: `queue`, `start`, `wait`, `collect` (cartlib/grid.py; docs/parallel.md).

    .venv/bin/python scripts/queue_grid.py queue --force full no_fusion
    .venv/bin/python scripts/queue_grid.py start --jobs 2
    .venv/bin/python scripts/queue_grid.py collect
"""
import sys

from cartlib.grid import main

if __name__ == "__main__":
    sys.exit(main())
