"""`mima attack-sweep`: methods x learning rates x step budgets on one model and concept (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mima.cli._args import add_config_arguments, add_device_argument, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.attacks.config import AttackConfig

    parser = subparsers.add_parser("attack-sweep", help="a grid of attacks on one concept (resumable)")
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id (default toy)")
    parser.add_argument("--concept", required=True, help="toy:<concept>, an image folder, or a concept YAML file")
    parser.add_argument(
        "--methods", nargs="+", default=["dreambooth", "lora", "textual-inversion", "custom-diffusion"]
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates (default: each method's own)")
    parser.add_argument("--budgets", nargs="+", type=int, help="step budgets (default: each method's own)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: <method>/lr<lr>/steps<k>/")
    parser.add_argument("--config", type=Path, help="YAML of AttackConfig settings shared by every run")
    add_device_argument(parser)
    add_config_arguments(parser, AttackConfig, skip=("method", "lr", "steps"))
    parser.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> None:
    from mima.attacks import AttackConfig
    from mima.attacks.sweep import run_sweep
    from mima.cli.attack import concept_from_arg

    folders = run_sweep(
        args.model, concept_from_arg(args.concept), config_from_args(AttackConfig, args), args.methods,
        args.lrs or [None], args.budgets or [None], args.out, device=args.device,
    )
    print(f"{len(folders)} runs under {args.out}")
