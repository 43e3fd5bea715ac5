"""`mima benchmark` and `mima demo`: immunize with every method, attack, evaluate, report (resumable)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from mima.benchmark import PRESETS

    bench = subparsers.add_parser("benchmark", help="immunize -> attack -> evaluate -> report, for every method")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="benchmark YAML (see mima/assets/presets/*.yaml)")
    source.add_argument("--preset", choices=PRESETS, help="a shipped benchmark")
    bench.add_argument("--out", type=Path, required=True, help="output folder; re-running resumes it")
    bench.set_defaults(func=_benchmark)

    demo = subparsers.add_parser("demo", help="the end-to-end demo on the toy model (the README's main command)")
    demo.add_argument("--quick", action="store_true", help="a few-minute smoke run of the same path")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.set_defaults(func=_demo)


def _run(config, out: Path) -> None:
    from mima.benchmark import Benchmark

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / "benchmark_config.json")
    report = Benchmark(config, out).run()
    print(f"report: {report / 'report.html'} (also report.md, metrics.json) in {time.time() - started:.0f} s")


def _benchmark(args: argparse.Namespace) -> None:
    from mima.benchmark import BenchmarkConfig

    _run(BenchmarkConfig.preset(args.preset) if args.preset else BenchmarkConfig.from_yaml(args.config), args.out)


def _demo(args: argparse.Namespace) -> None:
    from mima.benchmark import BenchmarkConfig

    preset = "toy-demo-quick" if args.quick else "toy-demo"
    _run(BenchmarkConfig.preset(preset), args.out / ("quick" if args.quick else ""))
