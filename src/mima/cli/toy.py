"""`mima toy ...`: the toy world's concepts and images, and the shipped toy model."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shutil
from pathlib import Path

from mima.cli import toy_pretrain
from mima.cli._args import (
    add_device_argument,
    add_output_file_arguments,
    check_output_file,
    finite_float,
    positive_int,
)
from mima.errors import ConfigError, ModelError
from mima.toy.world import toy_concepts


def register(subparsers: argparse._SubParsersAction) -> None:
    toy = subparsers.add_parser("toy", help="the toy world: concepts, images and the toy model")
    commands = toy.add_subparsers(dest="toy_command", metavar="COMMAND", required=True)

    concepts = commands.add_parser("concepts", help="list the toy concepts (styles and objects)")
    concepts.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    concepts.set_defaults(func=_concepts)

    images = commands.add_parser("images", help="write N images of one concept and a metadata.csv of prompts")
    images.add_argument("concept", metavar="CONCEPT", help="a toy concept, see `mima toy concepts`")
    images.add_argument("--n", type=positive_int, required=True, help="number of images")
    images.add_argument("--out", type=Path, required=True, help="output folder")
    images.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    images.add_argument("--overwrite", action="store_true", help="replace the images already in --out")
    images.set_defaults(func=_images)

    export = commands.add_parser("export", help="copy the shipped toy model (a diffusers folder) to DIR")
    export.add_argument("dir", metavar="DIR", type=Path, help="destination; must not exist or be empty")
    export.set_defaults(func=_export)

    judge = commands.add_parser("judge", help="rate how well a model draws each toy concept (the toy judge)")
    judge.add_argument("--model", default="toy", help="'toy' or a diffusers folder (default toy)")
    judge.add_argument("--n", type=positive_int, default=32, help="samples per prompt (default 32)")
    judge.add_argument("--guidance", type=finite_float, default=4.0, help="guidance scale (default 4.0)")
    judge.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default 25)")
    add_output_file_arguments(judge, help="also write the rates as JSON here", required=False)
    add_device_argument(judge)
    judge.set_defaults(func=_judge)

    toy_pretrain.register(commands)


def _concepts(args: argparse.Namespace) -> None:
    rows = [{**dataclasses.asdict(c), "prompts": list(c.prompts)} for c in toy_concepts()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<10} {'family':<7} {'held-out':<9} prompts")
    for row in rows:
        held_out = "yes" if row["held_out"] else "no"
        print(f"{row['name']:<10} {row['family']:<7} {held_out:<9} {' | '.join(row['prompts'])}")


def _judge(args: argparse.Namespace) -> None:
    from mima.models.components import Components
    from mima.toy.judge import load_default_judge
    from mima.toy.quality import concept_rates, summarize
    from mima.utils.device import resolve_device
    from mima.utils.io import atomic_write_text

    if args.out:
        check_output_file(args.out, args.overwrite)  # before the model loads
    device = resolve_device(args.device)
    rates = concept_rates(Components.from_pretrained(args.model).to(device), load_default_judge().to(device),
                          n=args.n, steps=args.steps, guidance_scale=args.guidance)
    for group, values in rates.items():
        print(f"{group}: " + ", ".join(f"{name} {100 * rate:.0f}%" for name, rate in values.items()))
    for group, stats in summarize(rates).items():
        print(f"{group}: mean {100 * stats['mean']:.1f}%, min {100 * stats['min']:.1f}%")
    if args.out:
        record = {"rates": rates, "summary": summarize(rates)}
        atomic_write_text(args.out, json.dumps(record, indent=2, sort_keys=True))


def _images(args: argparse.Namespace) -> None:
    from mima.data.image_folder import write_image_folder
    from mima.toy.world import sample_concept_images
    from mima.utils.run_folder import TOY_IMAGES, claim_run_folder

    _check_concept(args.concept)
    claim_run_folder(args.out, TOY_IMAGES, overwrite=args.overwrite)
    images, prompts = sample_concept_images(args.concept, args.n, seed=args.seed)
    print(write_image_folder(images, prompts, args.out))


def _check_concept(name: str) -> None:
    names = [c.name for c in toy_concepts()]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(names)}"
        raise ConfigError(f"unknown toy concept '{name}'; {hint} (see `mima toy concepts`)")


def _export(args: argparse.Namespace) -> None:
    from mima.models.components import toy_model_dir

    source = toy_model_dir()
    if not (source / "model_index.json").is_file():
        raise ModelError(f"the shipped toy model is missing from '{source}'; build one with `mima toy pretrain`")
    if args.dir.exists() and not (args.dir.is_dir() and not any(args.dir.iterdir())):
        raise ConfigError(f"'{args.dir}' already exists and is not an empty folder")
    print(shutil.copytree(source, args.dir, dirs_exist_ok=True))
