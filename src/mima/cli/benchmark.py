"""`mima benchmark` and `mima demo`: immunize with every method, attack, evaluate, report (resumable)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mima.cli._args import add_device_argument, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.benchmark import PRESETS

    bench = subparsers.add_parser("benchmark", help="immunize -> attack -> evaluate -> report, for every method")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="benchmark or suite YAML (see mima/assets/presets/*.yaml)")
    source.add_argument("--preset", choices=PRESETS, help="a shipped benchmark")
    bench.add_argument("--out", type=Path, required=True, help="output folder; re-running resumes it")
    _add_jobs(bench)
    bench.set_defaults(func=_benchmark)

    demo = subparsers.add_parser("demo", help="the end-to-end demo on the toy model (the README's main command)")
    demo.add_argument("--quick", action="store_true", help="a few-minute smoke run of the same path")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    _add_jobs(demo)
    demo.set_defaults(func=_demo)


def _add_jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="immunizations and attacks run at a time, each in a worker process (default 1)")
    add_device_argument(parser)


def _run(benchmarks: dict, out: Path, jobs: int, device: str) -> None:
    """Run every benchmark of a file or preset; a suite's part P goes to OUT/P."""
    from mima.benchmark import Benchmark
    from mima.utils.device import resolve_device

    resolve_device(device)  # an unavailable device: one line, before anything runs
    for part, config in benchmarks.items():
        started = time.time()
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        config.save_json(folder / "benchmark_config.json")
        report = Benchmark(config, folder, jobs=jobs, device=device).run()
        name = f"{part}: " if part else ""
        elapsed = time.time() - started
        print(f"{name}report: {report / 'report.html'} (also report.md, metrics.json) in {elapsed:.0f} s")


def _benchmark(args: argparse.Namespace) -> None:
    from mima.benchmark import load_benchmarks, load_preset

    benchmarks = load_preset(args.preset) if args.preset else load_benchmarks(args.config)
    _run(benchmarks, args.out, args.jobs, args.device)


def _demo(args: argparse.Namespace) -> None:
    from mima.benchmark import load_preset

    preset = "toy-demo-quick" if args.quick else "toy-demo"
    _run(load_preset(preset), args.out / ("quick" if args.quick else ""), args.jobs, args.device)
