"""`mima validate`: check a settings or concept file without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("immunize", "attack", "pretrain", "concepts")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check a YAML settings file or a concept list")
    parser.add_argument("file", type=Path, help="YAML (or the authors' JSON concept list)")
    parser.add_argument("--kind", choices=KINDS, help="what the file holds (default: concepts if it lists concepts, "
                        "else immunize settings)")
    parser.set_defaults(func=_validate)


def _config_class(kind: str) -> type:
    if kind == "attack":
        from mima.attacks import AttackConfig

        return AttackConfig
    if kind == "pretrain":
        from mima.toy.pretrain import ToyPretrainConfig

        return ToyPretrainConfig
    from mima.immunize import ImmunizeConfig

    return ImmunizeConfig


def _validate(args: argparse.Namespace) -> None:
    from mima.data.concepts import load_concepts

    text = args.file.read_text(encoding="utf-8") if args.file.is_file() else ""
    kind = args.kind or ("concepts" if args.file.suffix == ".json" or "concepts:" in text else "immunize")
    if kind == "concepts":
        specs = load_concepts(args.file)
        print(f"{args.file}: {len(specs)} concept(s): {', '.join(s.name for s in specs)}")
        return
    config = _config_class(kind).from_yaml(args.file)
    print(f"{args.file}: valid {type(config).__name__}")
    for name, value in sorted(config.to_dict().items()):
        print(f"  {name}: {value}")
