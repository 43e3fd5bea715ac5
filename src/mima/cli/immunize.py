"""`mima immunize`: make a model hard to fine-tune on a list of concepts."""

from __future__ import annotations

import argparse
from pathlib import Path

from mima.cli._args import add_config_arguments, add_device_argument, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.immunize.config import ImmunizeConfig

    parser = subparsers.add_parser("immunize", help="immunize a model against fine-tuning on target concepts")
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id (default toy)")
    parser.add_argument(
        "--concepts", required=True,
        help="a YAML/JSON concept file, or comma-separated entries such as 'toy:stripes,toy:dots'",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (model/, immunization.json)")
    parser.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out (deleting it first)")
    add_device_argument(parser)
    add_config_arguments(parser, ImmunizeConfig)
    parser.set_defaults(func=_immunize)


def _immunize(args: argparse.Namespace) -> None:
    from mima.data.concepts import load_concepts_arg
    from mima.immunize import ImmunizationRun, ImmunizeConfig

    config = config_from_args(ImmunizeConfig, args)
    specs = load_concepts_arg(args.concepts)
    run = ImmunizationRun(args.model, specs, config, args.out, args.device)
    model_dir = run.run(resume=args.resume, overwrite=args.overwrite)
    print(f"immunized model: {model_dir}\nrecord: {args.out / 'immunization.json'}")
