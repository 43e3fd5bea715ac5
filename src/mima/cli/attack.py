"""`mima attack`: fine-tune a model on one concept with an adaptation method, sampling as it goes."""

from __future__ import annotations

import argparse
from pathlib import Path

from mima.cli._args import add_config_arguments, add_device_argument, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.attacks.config import AttackConfig

    parser = subparsers.add_parser("attack", help="adapt a model to one concept (DreamBooth, LoRA, TI, CD)")
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id (default toy)")
    parser.add_argument("--concept", required=True, help="toy:<concept>, an image folder, or a concept YAML file")
    parser.add_argument("--out", type=Path, required=True, help="output folder (export/, samples/, attack.json)")
    parser.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out (deleting it first)")
    add_device_argument(parser)
    add_config_arguments(parser, AttackConfig)
    parser.set_defaults(func=_attack)


def concept_from_arg(text: str):
    """The one concept of `--concept`: toy:<name>, an image folder, or the first entry of a concept file."""
    from mima.data.concepts import load_concepts_arg

    return load_concepts_arg(text)[0]


def _attack(args: argparse.Namespace) -> None:
    from mima.attacks import AttackConfig, AttackRun

    config = config_from_args(AttackConfig, args)
    run = AttackRun(args.model, concept_from_arg(args.concept), config, args.out, args.device)
    export = run.run(resume=args.resume, overwrite=args.overwrite)
    print(f"attack artifact: {export}\nsamples: {args.out / 'samples'}\nrecord: {args.out / 'attack.json'}")
