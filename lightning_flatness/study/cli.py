"""The ``lightning-flatness`` command: ``sweep`` (the batch-size study) and ``report`` (compare runs).

    lightning-flatness sweep [--lr-sweep] [--data mnist1d|digits|mnist|cifar10] ...
    lightning-flatness report LOGDIR [--out DIR] [--at-train-loss X]

``python -m lightning_flatness ...`` is the same command.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from .. import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import report, sweep

    parser = argparse.ArgumentParser(
        prog="lightning-flatness",
        description="Loss-landscape flatness and the generalization gap: run the batch-size study, compare runs.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-flatness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sweep,report}")
    sweep.add_arguments(sub.add_parser(
        "sweep", help="train one MLP at several batch sizes (or learning rates) to the same training loss, "
        "measuring flatness; then report", description=sweep.DESCRIPTION,
    ))  # fmt: skip
    report.add_arguments(sub.add_parser(
        "report", help="plots and a table of every run's flatness and gap, with rank correlations",
        description=report.DESCRIPTION,
    ))  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        from .sweep import config_from_args, run_sweep

        run_sweep(config_from_args(args))
    else:
        from .report import ReportError, make_report

        try:
            make_report(args.logdir, args.out, args.at_train_loss, plots=args.plots)
        except ReportError as err:
            raise SystemExit(f"lightning-flatness report: error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
