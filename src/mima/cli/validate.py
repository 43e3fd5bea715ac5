"""`mima validate`: check a settings, concept or benchmark file with exactly the checks a run makes before it loads
a model, without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("immunize", "attack", "pretrain", "concepts", "benchmark")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check a YAML settings file, a concept list or a benchmark")
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
    from mima.config import read_text

    text = read_text(args.file, "file")
    kind = args.kind or ("concepts" if args.file.suffix == ".json" or "concepts:" in text else "immunize")
    if kind == "concepts":
        _validate_concepts(args.file)
    elif kind == "benchmark":
        _validate_benchmark(args.file)
    else:
        config = _config_class(kind).from_yaml(args.file)
        if kind == "attack":
            from mima.attacks import attacks

            config = attacks.get(config.method).settings(config)  # as the run resolves it, the method's defaults in
        elif kind == "immunize":
            config = config.for_setting()  # as the run resolves it, the setting's defaults in
        if hasattr(config, "check_names"):
            config.check_names()
        print(f"{args.file}: valid {type(config).__name__}")
        for name, value in sorted(config.to_dict().items()):
            print(f"  {name}: {value}")


def _validate_concepts(path: Path) -> None:
    from mima.data.concepts import load_concepts, validate_images

    specs = load_concepts(path)
    for spec in specs:
        if spec.toy is None:
            validate_images(spec)
    print(f"{path}: {len(specs)} concept(s): {', '.join(s.name for s in specs)}")


def _validate_benchmark(path: Path) -> None:
    from mima.benchmark import Benchmark, load_benchmarks

    for part, config in load_benchmarks(path).items():
        plan = Benchmark(config, Path(part or ".")).plan()
        name = f"{part}: " if part else ""
        print(f"{path}: {name}valid benchmark of {len(plan.immunizations)} models, each attacked with "
              f"{', '.join(config.attack_names())}")
