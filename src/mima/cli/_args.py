"""Argument types shared by the subcommand modules."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """An `argparse` type accepting integers >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """An `argparse` type accepting finite numbers (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return value
def add_output_file_arguments(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """`--out FILE` and `--overwrite`: a file already there is replaced only when asked (`check_output_file`)."""
    parser.add_argument("--out", type=Path, required=required, help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, to replace an existing file without `--overwrite` (or to write over a
    folder), and create the file's folder (an unwritable destination fails here too)."""
    from mima.errors import ConfigError

    if path.is_dir():
        raise ConfigError(f"--out '{path}' is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out '{path}' exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device`, checked (with `mima.utils.device.resolve_device`) before any model loads."""
    parser.add_argument(
        "--device", default="auto", metavar="DEVICE",
        help="where models run: auto (the first GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps "
        "(default auto)",
    )


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of a `Config` dataclass, defaulting to None ("not given": YAML or default wins)."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = hints[f.name]
        # `int | None`: None is the field's own default. `Literal[...] | None` is a typing.Union, not a UnionType.
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        stated = "" if f.default is None else f" (default {f.default!r})"  # None: the help says what decides it
        options: dict = {"default": None, "help": f.metadata.get("help", "") + stated}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            options["nargs"] = "+"
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            options["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def config_from_args(config_class: type, args: argparse.Namespace, **given: object):
    """Precedence CLI > YAML (`args.config`) > defaults; `given` are values the subcommand sets itself."""
    import dataclasses

    config = config_class.from_yaml(args.config) if getattr(args, "config", None) else config_class()
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_class)}
    return config.with_overrides(**{**overrides, **{k: v for k, v in given.items() if v is not None}})
