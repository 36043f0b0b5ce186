"""The ``pfc-fast`` command line (also ``python -m pfc_fast``).

- ``pfc-fast train``: train a ResNet and measure PFC at every layer, every epoch
  (:mod:`pfc_fast.app.train`);
- ``pfc-fast report RUN_DIR``: figures and summary of a run (:mod:`pfc_fast.app.report`);
- ``pfc-fast demo``: NC metrics of every layer of a small network on digits, in seconds
  (:mod:`pfc_fast.app.demo`).

The benchmarks are not part of the installed package: ``python -m benchmarks`` in the repository
root runs them.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import demo, report, train


def _summary(doc: str | None) -> str:
    return (doc or "").split("\n\n")[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pfc-fast`` with the arguments ``argv`` (default: the command line); returns the exit
    status (bad arguments: ``SystemExit(2)`` with the message on stderr)."""
    parser = argparse.ArgumentParser(prog="pfc-fast", description=_summary(__doc__))
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = demo.add_arguments(commands.add_parser(
        "demo", help="NC metrics of every layer of a small network on digits", description=_summary(demo.__doc__)))
    demo_parser.set_defaults(run=demo.run)
    train_parser = train.add_arguments(commands.add_parser(
        "train", help="train a ResNet, measure PFC of every layer every epoch", description=_summary(train.__doc__)))
    train_parser.set_defaults(run=lambda args: train.run_cli(args, train_parser))
    report_parser = report.add_arguments(commands.add_parser(
        "report", help="figures and summary of a pfc-fast train run", description=_summary(report.__doc__)))
    report_parser.set_defaults(run=lambda args: report.run_cli(args, report_parser))
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status
