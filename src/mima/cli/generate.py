"""`mima generate`: sample images of one prompt from a model into one grid image."""

from __future__ import annotations

import argparse

from mima.cli._args import (
    add_device_argument,
    add_output_file_arguments,
    check_output_file,
    finite_float,
    positive_int,
)
from mima.errors import ConfigError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="sample N images of a prompt into one grid image")
    parser.add_argument(
        "--model", default="toy", help="'toy' (the shipped model, default), a local diffusers folder or a hub id"
    )
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--n", type=positive_int, default=4, help="number of images (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i depends only on (seed, i) (default 0)")
    parser.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=finite_float, default=4.0,
                        help="classifier-free guidance scale (default 4.0)")
    add_output_file_arguments(parser, help="output image, e.g. outputs/star.png")
    add_device_argument(parser)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="sample with the weights cast to this dtype (fp16: GPU only) (default no: float32)")
    parser.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() not in _IMAGE_SUFFIXES:
        raise ConfigError(f"--out '{args.out}' must end in one of {', '.join(_IMAGE_SUFFIXES)}")
    check_output_file(args.out, args.overwrite)  # before the model loads

    from mima.models.components import Components
    from mima.sampling import sample_images, save_grid
    from mima.utils.device import resolve_placement

    placement = resolve_placement(args.device, args.mixed_precision)
    components = Components.from_pretrained(args.model).to(placement.device, placement.dtype)
    images = sample_images(
        components, [args.prompt] * args.n, seed=args.seed, steps=args.steps, guidance_scale=args.guidance
    )
    print(save_grid(images, args.out))
