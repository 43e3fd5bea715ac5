"""`mima toy pretrain`: train the toy model from scratch (the recipe of the shipped one)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mima.cli._args import add_device_argument, positive_int


def register(toy_subparsers: argparse._SubParsersAction) -> None:
    parser = toy_subparsers.add_parser(
        "pretrain", help="train the toy model from scratch; resumes from OUT/checkpoint when it exists"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint/, model/, samples.png")
    parser.add_argument("--config", type=Path, help="YAML file of ToyPretrainConfig fields (CLI options win)")
    parser.add_argument("--steps", type=positive_int, help="UNet + text encoder steps (stage 2)")
    parser.add_argument("--focus-steps", type=int, help="object-focus steps (stage 3; 0 skips it)")
    parser.add_argument("--vae-steps", type=positive_int, help="VAE steps (stage 1)")
    parser.add_argument("--batch-size", type=positive_int, help="UNet batch size")
    parser.add_argument("--seed", type=int, help="seed of initialisation, data and noise")
    parser.add_argument("--size", choices=("small", "tiny"), help="'small' (shipped) or 'tiny' (tests)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_device_argument(parser)
    parser.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> None:
    import torch

    from mima.toy.pretrain import ToyPretrainConfig, pretrain_toy
    from mima.utils.device import resolve_device

    device = resolve_device(args.device)
    cfg = ToyPretrainConfig.from_yaml(args.config) if args.config else ToyPretrainConfig()
    cfg = cfg.with_overrides(
        steps=args.steps, focus_steps=args.focus_steps, vae_steps=args.vae_steps, batch_size=args.batch_size,
        seed=args.seed, size=args.size,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.out / "checkpoint").is_dir():
        print(f"resuming from {args.out / 'checkpoint'}")
    model_dir = pretrain_toy(cfg, args.out, device)
    print(f"model: {model_dir}")
    print(f"samples: {args.out / 'samples.png'}")
