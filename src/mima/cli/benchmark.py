"""`mima benchmark` and `mima demo`: immunize with every method, attack, evaluate, report (resumable)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mima.cli._args import add_device_argument, positive_int

if TYPE_CHECKING:
    from mima.executors import Executor


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.benchmark import PRESETS

    bench = subparsers.add_parser("benchmark", help="immunize -> attack -> evaluate -> report, for every method")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="benchmark or suite YAML (see mima/assets/presets/*.yaml)")
    source.add_argument("--preset", choices=PRESETS, help="a shipped benchmark")
    bench.add_argument("--out", type=Path, required=True, help="output folder; re-running resumes it")
    _add_executor_flags(bench)
    bench.set_defaults(func=_benchmark)

    demo = subparsers.add_parser("demo", help="the end-to-end demo on the toy model (the README's main command)")
    demo.add_argument("--quick", action="store_true", help="a few-minute smoke run of the same path")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    _add_executor_flags(demo)
    demo.set_defaults(func=_demo)


def _add_executor_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where pieces run: local worker processes (default) or Ray tasks (pip install mima[ray])")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="local: immunizations and attacks run at a time, each in a worker process (default 1; "
                             "`mima demo` on the CPU: one per CPU thread, up to 8)")
    ray = parser.add_argument_group("Ray (--executor ray)")
    ray.add_argument("--ray-address", help="a cluster to join ('auto': the one `ray start` runs here; default: "
                                           "start a local Ray for this run)")
    ray.add_argument("--piece-cpus", type=positive_int, default=None,
                     help="CPUs each piece declares and uses as torch threads (default 1)")
    ray.add_argument("--piece-gpus", type=float, default=None, help="GPUs each piece declares (default 0)")
    add_device_argument(parser)


def _executor(args: argparse.Namespace) -> Executor:
    """The executor the flags ask for; a flag of the other executor is an error, before any work."""
    from mima.errors import ConfigError
    from mima.executors import make_executor

    foreign = ["--jobs"] if args.executor == "ray" and args.jobs is not None else []
    if args.executor == "local":
        foreign = [flag for flag, value in (("--ray-address", args.ray_address), ("--piece-cpus", args.piece_cpus),
                                            ("--piece-gpus", args.piece_gpus)) if value is not None]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)} does not apply to --executor {args.executor}")
    if args.piece_gpus is not None and not 0 <= args.piece_gpus < float("inf"):
        raise ConfigError(f"--piece-gpus must be >= 0, got {args.piece_gpus}")
    return make_executor(args.executor, jobs=args.jobs or 1, address=args.ray_address, cpus=args.piece_cpus or 1,
                         gpus=args.piece_gpus or 0.0)


def _run(benchmarks: dict, out: Path, args: argparse.Namespace) -> None:
    """Run every benchmark of a file or preset; a suite's part P goes to OUT/P. Every part's whole grid is resolved
    before the first piece of any part runs."""
    from mima.benchmark import Benchmark
    from mima.utils.device import resolve_device

    resolve_device(args.device)  # an unavailable device: one line, before anything runs
    plans = {part: Benchmark(config, out / part, device=args.device).plan() for part, config in benchmarks.items()}
    with _executor(args) as executor:
        for part, config in benchmarks.items():
            started = time.time()
            report = Benchmark(config, out / part, executor=executor, device=args.device).run(plans[part])
            name = f"{part}: " if part else ""
            elapsed = time.time() - started
            print(f"{name}report: {report / 'report.html'} (also report.md, metrics.json) in {elapsed:.0f} s")


def _benchmark(args: argparse.Namespace) -> None:
    from mima.benchmark import load_benchmarks, load_preset

    _run(load_preset(args.preset) if args.preset else load_benchmarks(args.config), args.out, args)


def _demo(args: argparse.Namespace) -> None:
    from mima.benchmark import load_preset

    preset = "toy-demo-quick" if args.quick else "toy-demo"
    if args.executor == "local" and args.jobs is None:
        args.jobs = _demo_jobs(args.device)
    _run(load_preset(preset), args.out / ("quick" if args.quick else ""), args)


def _demo_jobs(device: str | None) -> int:
    """One worker per CPU thread when the toy runs on the CPU, up to 8 (each holds its own copy of torch and the
    models): its small layers keep one thread busy but not two (two 1-thread attacks side by side finished in 41.7 s
    where one 2-thread attack took 35.8 s, 2 cores); one on an accelerator."""
    import torch

    from mima.utils.device import resolve_device

    return min(torch.get_num_threads(), 8) if resolve_device(device).type == "cpu" else 1
