"""Immunize and attack an SD-1.5-sized random pipeline at 512 px through the `mima` CLI, as a user would, on a GPU.

    python scripts/device_run.py --device cuda --mixed-precision bf16 --out device-run
    python scripts/device_run.py --device cpu --width tiny --resolution 64 --out /tmp/dry-run   # a dry run

The pipeline is tests/sd_shaped.py's, with SD 1.5's UNet at its own widths (`--width full`: 860M parameters) or at
the fixture's (`tiny`). Each stage is one command in its own process: `mima immunize` (MIMA, the shipped defaults, N
concepts of random images), `mima attack` (LoRA on the base and on the immunized model; DreamBooth, Textual
Inversion and Custom Diffusion on the immunized model), `mima evaluate`, then benchmarks/immunize_step.py on
`--device` with the same model (each N in a process of its own). For each it records the exit status, the seconds,
and the peak memory the run's own record gives (immunization.json / attack.json: `peak_memory_mib`, torch's peak
allocation on a GPU). A failed stage does not stop the next. Prints a table and writes OUT/device_run.json after
every stage. What it measured on one H200: README.md, "Devices and precision".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
NAMES = ("Zorblax Quenn", "Velmur Osk", "Daphtrin Kel", "Ythrond Pim")


def _build_model(width: str, resolution: int, out: Path) -> Path:
    import sd_shaped

    if width == "tiny":
        return sd_shaped.build_sd15_shaped(out, resolution=resolution)
    channels = sd_shaped.SD15_CHANNELS if width == "full" else sd_shaped.SD15_HALF_CHANNELS
    return sd_shaped.build_sd15_wide(out, channels=channels, resolution=resolution)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _write_concepts(root: Path, n: int, resolution: int) -> tuple[Path, Path]:
    """N concepts named like real ones (no word of their prompt), 4 random images each, class images to generate:
    a concept file of all of them, and one of the first alone (what `mima attack --concept` takes)."""
    from mima.data.image_folder import write_image_folder

    rng = np.random.default_rng(0)
    entries = []
    for name in NAMES[:n]:
        prompt = f"a painting in the style of {name}"
        write_image_folder(rng.integers(0, 256, (4, resolution, resolution, 3), dtype=np.uint8), [prompt] * 4,
                           root / _slug(name))
        entries.append(f"  - name: {_slug(name)}\n    prompt: {prompt}\n    images: {_slug(name)}\n"
                       "    class_prompt: a painting\n    class_images: class-painting\n")
    every, first = root / "concepts.yaml", root / "first.yaml"
    every.write_text("concepts:\n" + "".join(entries))
    first.write_text("concepts:\n" + entries[0])
    return every, first


class Stages:
    def __init__(self, out: Path, settings: dict) -> None:
        self.out, self.record = out, {"settings": settings, "stages": []}

    def run(self, name: str, command: list[str], timeout: float, record: Path | None = None, show: bool = False):
        started = time.time()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        row = {"stage": name, "rc": rc, "seconds": round(time.time() - started, 1)}
        if record is not None and record.exists():
            data = json.loads(record.read_text())
            row |= {k: data.get(k) for k in ("peak_memory_mib", "elapsed_s", "device", "mixed_precision")}
            if data.get("log"):
                row["steps"] = len(data["log"])
        if rc != 0 or show:
            row["output_tail"] = output[-3000:]
        self.record["stages"].append(row)
        (self.out / "device_run.json").write_text(json.dumps(self.record, indent=2) + "\n")
        peak = row.get("peak_memory_mib")
        print(f"{name:<34} rc {rc!s:<8} {row['seconds']:>7.1f} s  peak {peak if peak is not None else '-':>9} MiB",
              flush=True)
        if "output_tail" in row:
            print(row["output_tail"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16"))  # immunization refuses fp16
    parser.add_argument("--width", default="full", choices=("full", "half", "tiny"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=3, choices=range(1, len(NAMES) + 1))
    parser.add_argument("--immunize-steps", type=int, default=10)
    parser.add_argument("--attack-steps", type=int, default=50)
    parser.add_argument("--benchmark-concepts", type=int, nargs="*", default=[1, 3, 8, 16],
                        help="N for benchmarks/immunize_step.py (none: skip it)")
    parser.add_argument("--work", type=Path, help="where models and runs go (default OUT/work)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out, {k: str(v) for k, v in vars(args).items()})
    started = time.time()
    model = _build_model(args.width, args.resolution, work / "model")
    concepts, first = _write_concepts(work / "data", args.concepts, args.resolution)
    print(f"model built and data written in {time.time() - started:.0f} s", flush=True)
    mima = [sys.executable, "-m", "mima"]
    placement = ["--device", args.device, "--mixed-precision", args.mixed_precision]
    immunized = work / "immunized"
    stages.run("immunize mima", [*mima, "immunize", "--model", str(model), "--concepts", str(concepts),
                                 "--out", str(immunized), "--steps", str(args.immunize_steps), "--batch-size", "1",
                                 "--n-images", "4", "--n-class-images", "2", "--save-every", "5", *placement],
               timeout=600, record=immunized / "immunization.json")
    attack = [*mima, "attack", "--concept", str(first), "--eval-images", "2", "--sampling-steps", "10",
              "--batch-size", "1", "--n-images", "4", "--n-class-images", "2", *placement]
    runs = [("lora", model, "base", args.attack_steps), ("lora", immunized / "model", "immunized", args.attack_steps)]
    runs += [(m, immunized / "model", "immunized", max(args.attack_steps // 5, 2))
             for m in ("dreambooth", "textual-inversion", "custom-diffusion")]
    for method, target, label, steps in runs:
        run_dir = work / f"attack-{method}-{label}"
        stages.run(f"attack {method} ({label})", [*attack, "--model", str(target), "--method", method, "--steps",
                                                   str(steps), "--save-every", str(steps), "--out", str(run_dir)],
                   timeout=600, record=run_dir / "attack.json")
    slug = _slug(NAMES[0])
    stages.run("evaluate", [*mima, "evaluate", "--without", str(work / "attack-lora-base"),
                            "--with", str(work / "attack-lora-immunized"),
                            "--references", f"{slug}={work / 'data' / slug}", "--device", args.device,
                            "--out", str(work / "evaluate")], timeout=300)
    if args.benchmark_concepts:
        stages.run("benchmark immunize_step", [
            sys.executable, str(REPO / "benchmarks" / "immunize_step.py"), "--model", str(model),
            "--device", args.device, "--mixed-precision", args.mixed_precision,
            "--concepts", *map(str, args.benchmark_concepts),
            "--json", str(args.out / "immunize_step.json")], timeout=600, show=True)
    print(f"total {time.time() - started:.0f} s; {args.out / 'device_run.json'}")


if __name__ == "__main__":
    main()
