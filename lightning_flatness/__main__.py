"""``python -m lightning_flatness sweep|report ...``: the ``lightning-flatness`` command."""

from .study.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
