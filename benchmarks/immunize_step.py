"""Step time and peak memory of MIMA (second and first order) against plain fine-tuning, on the toy model.

Each (method, N) is measured in its own subprocess so that peak memory (max RSS on CPU, max allocated on CUDA)
belongs to that configuration alone. Prints a table of ratios measured in this one run:

    python benchmarks/immunize_step.py [--model toy] [--concepts 1 2 3 5] [--steps 3] [--batch-size 4] [--threads 1]
                                       [--methods mima-2nd mima-1st imma-joint imma] [--with-prior]

By default the objective is the core bi-level one (no class images); `--with-prior` adds class images so that
the prior-preservation and retain terms of the default settings are paid for too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONCEPTS = ("stripes", "checker", "dots", "circle", "star", "waves", "square", "heart")


TARGET_RATIO = {"mima-2nd": 3.5, "mima-1st": 2.0}


def _measure(model: str, method: str, n: int, steps: int, batch_size: int, with_prior: bool) -> dict[str, float]:
    """Run in the child process: mean seconds per step (after one warm-up), Merge seconds, peak memory."""
    import torch

    from mima.data.concepts import toy_concept_spec
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.losses import diffusion_loss, unet_caller
    from mima.models.components import Components
    from mima.models.encoding import EncodedConcept, EncodedImages
    from mima.utils.device import peak_memory_bytes

    components = Components.from_pretrained(model)
    size = components.unet.config.sample_size
    specs = [toy_concept_spec(name) for name in CONCEPTS[:n]]
    g = torch.Generator().manual_seed(0)

    def images(prompt: str) -> EncodedImages:
        latents = torch.randn(8, 4, size, size, generator=g)
        return EncodedImages(latents, torch.zeros_like(latents), components.encode_prompts([prompt] * 8).detach())

    concepts = [EncodedConcept(s.name, images(s.prompt), images(s.class_prompt or "") if with_prior else None)
                for s in specs]
    if method == "finetune":
        unet = components.unet
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def step() -> None:
            latents, hidden, _ = concepts[0].instance.sample(batch_size, g)
            diffusion_loss(unet_caller(unet), components.scheduler, latents, hidden, generator=g).backward()
            optimizer.step()
            optimizer.zero_grad()

        merge_seconds = []
    else:
        order = "first-order" if method == "mima-1st" else "second-order"
        config = ImmunizeConfig(order=order, caption_bank="toy", prior_weight=1.0 if with_prior else 0.0,
                                retain_weight=1.0 if with_prior else 0.0)
        immunizer = immunizers.get(method.removesuffix("-2nd").removesuffix("-1st"))(config)
        immunizer.prepare(components, specs, concepts)
        params = immunizer.trainable_parameters()
        optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
        merge_seconds = []
        if hasattr(immunizer, "plan"):
            merge = immunizer.plan.merge

            def timed_merge(*args):
                start = time.perf_counter()
                out = merge(*args)
                merge_seconds.append(time.perf_counter() - start)
                return out

            immunizer.plan.merge = timed_merge

        def step() -> None:
            batches = {c.name: (c.batch(batch_size, g), c.batch(batch_size, g)) for c in concepts}
            objective, _ = immunizer.objective(batches, g)
            objective.backward()
            optimizer.step()
            optimizer.zero_grad()

    step()  # warm-up
    merge_seconds.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    # The merge's forward time; its backward runs inside autograd and is not separable here.
    merge = sum(merge_seconds) / steps if merge_seconds else 0.0
    return {"step_s": seconds, "merge_s": merge, "peak_bytes": peak_memory_bytes("cpu") or 0}


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(_measure(args.model, args.child, args.n, args.steps, args.batch_size, args.with_prior)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="'toy' or a diffusers folder")
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["mima-2nd", "mima-1st"],
                        choices=["mima-2nd", "mima-1st", "imma-joint", "imma"])
    parser.add_argument("--with-prior", action="store_true", help="class images: prior and retain terms on")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    def run(method: str, n: int) -> dict[str, float]:
        command = [sys.executable, __file__, "--model", args.model, "--child", method, "--n", str(n),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   *(["--with-prior"] if args.with_prior else [])]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    import warnings

    warnings.filterwarnings("ignore", message="imma protects one concept")
    plain = run("finetune", 1)
    print(f"plain fine-tuning step (toy model, batch {args.batch_size}): {plain['step_s']:.3f} s, "
          f"peak {plain['peak_bytes'] / 2**20:.0f} MiB")
    print(f"{'N':>2} {'method':>12} {'step s':>8} {'/ N plain':>10} {'target':>7} {'merge %':>8} {'peak MiB':>9}")
    for n in args.concepts:
        for method in args.methods:
            r = run(method, n)
            ratio = r["step_s"] / (n * plain["step_s"])
            # The targets are for the core objective; the prior and retain terms add their own passes.
            target = f"{TARGET_RATIO[method]:.1f}" if method in TARGET_RATIO and not args.with_prior else "-"
            print(f"{n:>2} {method:>12} {r['step_s']:>8.3f} {ratio:>10.2f} {target:>7} "
                  f"{100 * r['merge_s'] / r['step_s']:>7.1f}% {r['peak_bytes'] / 2**20:>9.0f}")


if __name__ == "__main__":
    main()
