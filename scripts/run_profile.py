"""A profile (an overlay of params.yaml, e.g. params.full.yaml) as one `dvc exp run`
(cartlib/profiles.py; docs/full_profile.md).

    .venv/bin/python scripts/run_profile.py check params.full.yaml
    .venv/bin/python scripts/run_profile.py args  params.full.yaml
    .venv/bin/python scripts/run_profile.py run   params.full.yaml [--temp | --queue | -n NAME]
    .venv/bin/python scripts/run_profile.py apply params.full.yaml

(Not named profile.py: a script's folder comes first on sys.path, and `profile` would shadow the
standard library module that cProfile imports.)
"""
import sys

from cartlib.profiles import main

if __name__ == "__main__":
    sys.exit(main())
