"""`mima evaluate`: similarity curves, SGR, MSGR and MRSGR of attack runs without and with immunization."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mima.cli._args import add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="compare attack runs without and with immunization (S, SGR, MSGR, MRSGR, plots)"
    )
    parser.add_argument(
        "--without", nargs="+", type=Path, required=True, metavar="RUN",
        help="`mima attack` run folders attacking the model WITHOUT immunization, one per concept",
    )
    parser.add_argument(
        "--with", dest="with_runs", nargs="+", type=Path, required=True, metavar="RUN",
        help="`mima attack` run folders attacking the IMMUNIZED model; paired with --without by concept",
    )
    parser.add_argument(
        "--references", nargs="+", required=True, metavar="REF",
        help="'toy' (generate 64 toy-world images per concept into OUT/references), a folder with one subfolder "
        "per concept, and/or CONCEPT=DIR entries",
    )
    parser.add_argument(
        "--encoder", nargs="+", metavar="SPEC",
        help="image encoders, NAME or NAME:MODEL (see `mima ls encoders`; default: efficientnet-lite0, and toy-judge "
        "when every concept is a toy concept)",
    )
    parser.add_argument(
        "--non-targets", nargs="+", default=[], metavar="CONCEPT",
        help="concepts that were not immunized against (reported as non_target_sgr, excluded from MSGR)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (metrics.json, plots/, grids/)")
    add_device_argument(parser)
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from mima.evaluate import evaluate_runs, pair_runs, resolve_references, write_evaluation
    from mima.evaluate.evaluate import default_encoders
    from mima.evaluate.metrics import MRSGR, MSGR
    from mima.utils.device import resolve_device

    resolve_device(args.device)  # an unavailable device: one line, before any run is read
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = pair_runs(args.without, args.with_runs)
    references = resolve_references(args.references, list(pairs), args.out / "references")
    encoders = args.encoder or default_encoders(list(pairs))
    evaluation = evaluate_runs(pairs, references, encoders, non_targets=args.non_targets, device=args.device)
    path = write_evaluation(evaluation, args.out)
    for encoder, result in evaluation.encoders.items():
        print(f"{encoder}: MSGR {_fmt(result.value(MSGR))}  MRSGR {_fmt(result.value(MRSGR))}")
    print(f"metrics: {path}")


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"
