"""`mima attack-sweep`: methods x learning rates x step budgets x prompts on one model and concept (resumable),
ranked worst case first."""

from __future__ import annotations

import argparse
from pathlib import Path

from mima.cli._args import add_config_arguments, add_device_argument, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.attacks.config import AttackConfig

    parser = subparsers.add_parser("attack-sweep", help="a grid of attacks on one concept, worst case first")
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id (default toy)")
    parser.add_argument("--concept", required=True, help="toy:<concept>, an image folder, or a concept YAML file")
    parser.add_argument(
        "--methods", nargs="+", default=["dreambooth", "lora", "textual-inversion", "custom-diffusion"]
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates (default: each method's own)")
    parser.add_argument("--budgets", nargs="+", type=int, help="step budgets (default: each method's own)")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT",
                        help="prompt modes: concept, fresh-token or a quoted TEXT (default: each method's own)")
    parser.add_argument("--reference-model", metavar="MODEL",
                        help="the un-immunized model: the same grid runs on it into OUT/reference/ and each run is "
                        "ranked by its MSGR against its twin there (default: ranked by the last checkpoint's "
                        "similarity to the concept's images)")
    parser.add_argument("--encoder", default="efficientnet-lite0", metavar="SPEC",
                        help="image encoder that ranks the runs (see `mima ls encoders`; default efficientnet-lite0)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: <method>/lr<lr>/steps<k>/prompt-<p>/, sweep.json")
    parser.add_argument("--config", type=Path, help="YAML of AttackConfig settings shared by every run")
    add_device_argument(parser)
    add_config_arguments(parser, AttackConfig, skip=("method", "lr", "steps", "prompt"))
    parser.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> None:
    from mima.attacks import AttackConfig
    from mima.attacks.sweep import run_sweep, sweep_runs
    from mima.cli.attack import concept_from_arg
    from mima.evaluate.encoders import encoders
    from mima.evaluate.sweep import rank_sweep, sweep_table, write_sweep
    from mima.utils.device import resolve_device

    resolve_device(args.device)  # an unavailable device: one line, before any tokenizer or model loads
    concept = concept_from_arg(args.concept)
    encoders.get(args.encoder.partition(":")[0])
    grid = (args.methods, args.lrs or [None], args.budgets or [None], args.prompts or [None])
    base = config_from_args(AttackConfig, args)
    runs = sweep_runs(args.model, concept, base, *grid, args.out, device=args.device)
    twins = (sweep_runs(args.reference_model, concept, base, *grid, args.out / "reference", device=args.device)
             if args.reference_model else [])
    folders = run_sweep(runs + twins)
    references = _references(concept, args.out)
    results = rank_sweep(folders[: len(runs)], references, args.encoder,
                         reference_runs=folders[len(runs):] if twins else None, device=args.device)
    path = write_sweep(results, args.encoder, args.out)
    order = "MSGR against the reference model, lowest first" if twins else "final similarity, highest first"
    print(f"{len(runs)} runs under {args.out}, worst case first ({order}; encoder {args.encoder}):")
    print(sweep_table(results))
    print(f"sweep: {path}")


def _references(concept, out: Path) -> Path:
    """The concept's images: the toy world's reference images of a toy concept, else its own image folder."""
    from mima.evaluate.evaluate import write_toy_references

    if concept.toy is not None:
        return write_toy_references([concept.toy], out / "references")[concept.toy]
    return concept.images
