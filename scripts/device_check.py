"""Check immunization and every attack on an accelerator against the CPU, in one short run (minutes on a GPU).

    python scripts/device_check.py --device cuda --out device-check            # the toy model
    python scripts/device_check.py --device cuda --model DIR --out device-check  # e.g. an SD-shaped pipeline

For each run (immunize with MIMA, with the finite-difference and with the exact Hessian-vector product; each attack;
LoRA again in fp16 with loss scaling) it records the losses of the first steps on `--device` in bf16 and on the CPU
in float32, which draw the same batches, noise and timesteps (the per-step generators live on the CPU), their
relative difference, the seconds per step, and whether on the device a LoRA run repeated, and one cut at a
checkpoint and resumed, end bit for bit where an uninterrupted one does (`--deterministic`: with torch's
deterministic algorithms where an op has one; those without warn, by name). Writes OUT/device_check.json and prints
a table. Nothing here is asserted: it measures.

Measured on one H200 (torch 2.11, CUDA 13, 2026-12-04, without --deterministic): first losses in bf16 within 0.4 %
of the CPU's for every attack and 5.8 % for immunization; the resumed LoRA run did not end bit for bit where the
uninterrupted one did (whether a repeated run does was not measured then).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mima.attacks import AttackConfig, AttackRun
from mima.attacks import trainer as attack_trainer
from mima.data.concepts import load_concepts
from mima.immunize import ImmunizationRun, ImmunizeConfig
from mima.utils.device import resolve_device
from mima.utils.io import load_tensors

ATTACKS = ("dreambooth", "lora", "textual-inversion", "custom-diffusion")
SMALL = dict(n_images=8, n_class_images=4, batch_size=2)


def _first_losses(record_path: Path, key: str) -> tuple[list[float], float]:
    record = json.loads(record_path.read_text())
    return [row[key] for row in record["log"]], record["elapsed_s"]


def _immunize(
    model: str, out: Path, device: str, precision: str, steps: int, hvp: str = "finite-difference"
) -> tuple[list[float], float]:
    config = ImmunizeConfig(steps=steps, caption_bank="auto", mixed_precision=precision, hvp=hvp, **SMALL)
    ImmunizationRun(model, load_concepts(["toy:stripes", "toy:star"]), config, out, device).run()
    return _first_losses(out / "immunization.json", "objective")


def _attack(model: str, method: str, out: Path, device: str, precision: str, steps: int) -> tuple[list[float], float]:
    config = AttackConfig(method=method, steps=steps, save_every=steps, eval_images=2, sampling_steps=5,
                          mixed_precision=precision, **SMALL)
    AttackRun(model, load_concepts(["toy:donut"])[0], config, out, device).run()
    return _first_losses(out / "attack.json", "loss")


def _lora_is_exact(model: str, out: Path, device: str) -> dict[str, bool]:
    """Whether a LoRA run repeated, and one cut after its first checkpoint and resumed, end where the first did."""
    config = AttackConfig(method="lora", steps=4, save_every=2, eval_images=1, sampling_steps=2, **SMALL)
    concept = load_concepts(["toy:donut"])[0]
    for run in ("full", "repeat"):
        AttackRun(model, concept, config, out / run, device).run()
    original = attack_trainer._Loop.train_step

    def cut(loop):
        if loop.step == 2:
            raise KeyboardInterrupt
        return original(loop)

    attack_trainer._Loop.train_step = cut
    try:
        AttackRun(model, concept, config, out / "cut", device).run()
    except KeyboardInterrupt:
        pass
    finally:
        attack_trainer._Loop.train_step = original
    AttackRun(model, concept, config, out / "cut", device).run(resume=True)
    full, repeated, resumed = (load_tensors(out / run / "export/pytorch_lora_weights.safetensors")
                               for run in ("full", "repeat", "cut"))
    return {f"{name}_bit_exact": all(torch.equal(full[k], other[k]) for k in full)
            for name, other in (("repeat", repeated), ("resume", resumed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms throughout")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic results
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops without one warn, naming themselves
    started, rows = time.time(), []
    runs = [("immunize mima", "bf16", lambda out, d, p: _immunize(args.model, out, d, p, args.steps)),
            ("immunize mima exact-hvp", "bf16",
             lambda out, d, p: _immunize(args.model, out, d, p, args.steps, "exact"))]
    runs += [(f"attack {m}", "bf16", lambda out, d, p, m=m: _attack(args.model, m, out, d, p, args.steps))
             for m in ATTACKS]
    if resolve_device(args.device).type != "cpu":  # fp16 is refused on the CPU
        runs += [("attack lora", "fp16", lambda out, d, p: _attack(args.model, "lora", out, d, p, args.steps))]
    for name, precision, run in runs:
        folder = args.out / f"{name.replace(' ', '-')}-{precision}"
        device_losses, device_s = run(folder / "device", args.device, precision)
        cpu_losses, cpu_s = run(folder / "cpu", "cpu", "no")
        difference = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(device_losses, cpu_losses, strict=True))
        rows.append({"run": name, "precision": precision, "device_losses": device_losses,
                     "cpu_fp32_losses": cpu_losses, "max_relative_difference": difference, "device_s": device_s,
                     "cpu_s": cpu_s})
        print(f"{name:<28} {precision}  max rel. diff {difference:.3f}  {device_s:.1f} s vs CPU {cpu_s:.1f} s")
    exact = _lora_is_exact(args.model, args.out / "resume", args.device)
    print(f"LoRA on {args.device}: {exact}; total {time.time() - started:.0f} s")
    result = {"device": args.device, "model": args.model, "deterministic": args.deterministic, "runs": rows, **exact,
              "torch": torch.__version__, "cuda": torch.version.cuda}
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
