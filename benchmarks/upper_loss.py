"""Does the ascent work? Each target's upper loss (diffusion loss of the adapted, merged model) on FIXED
evaluation batches, before and during immunization, for one method.

    python benchmarks/upper_loss.py [--model toy] [--concepts toy:stripes toy:checker toy:star] [--method mima]
                                    [--steps 60] [--every 10] [--eval-batches 4] [--out upper_loss.json]

Fixed batches (a fixed generator) remove the noise of random timesteps from the comparison, so a rise is the
ascent's doing. Prints one row per evaluation point and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _fixed_upper_losses(immunizer, concepts, n_batches: int, batch_size: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for k in range(n_batches):
        g = torch.Generator().manual_seed(10_000 + k)
        batches = {c.name: (c.batch(batch_size, g), c.batch(batch_size, g)) for c in concepts}
        _, logs = immunizer.objective(batches, g)
        for key, value in logs.items():
            if key.startswith("upper/"):
                totals[key[6:]] = totals.get(key[6:], 0.0) + value / n_batches
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concepts", nargs="+", default=["toy:stripes", "toy:checker", "toy:star"])
    parser.add_argument("--method", default="mima")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", default="upper_loss.json")
    parser.add_argument("--config", help="YAML of ImmunizeConfig overrides")
    args = parser.parse_args()

    from mima.data.concepts import load_concepts, materialize
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.immunize.erase import erase_targets
    from mima.models.components import Components
    from mima.models.encoding import encode_concept
    from mima.utils.device import step_generator

    config = ImmunizeConfig.from_yaml(args.config) if args.config else ImmunizeConfig()
    config = config.with_overrides(method=args.method, prior_weight=0.0, caption_bank="toy", steps=args.steps)
    components = Components.from_pretrained(args.model)
    specs = [materialize(s, Path("runs/upper-loss-data"), config.n_images) for s in load_concepts(args.concepts)]
    if config.setting == "relearn":
        erase_targets(components, specs, config)
    concepts = [encode_concept(components, s, with_prior=False) for s in specs]
    immunizer = immunizers.get(args.method)(config)
    immunizer.prepare(components, specs, concepts)
    params = immunizer.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=config.outer_lr, weight_decay=0.0)
    rows = [{"step": 0, **_fixed_upper_losses(immunizer, concepts, args.eval_batches, config.batch_size)}]
    print(rows[-1])
    for step in range(1, args.steps + 1):
        g = step_generator(config.seed, step)
        batches = {c.name: (c.batch(config.batch_size, g), c.batch(config.batch_size, g)) for c in concepts}
        objective, _ = immunizer.objective(batches, g)
        optimizer.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), config.grad_clip)
        optimizer.step()
        if step % args.every == 0:
            losses = _fixed_upper_losses(immunizer, concepts, args.eval_batches, config.batch_size)
            rows.append({"step": step, **losses})
            print(rows[-1])
    with open(args.out, "w") as f:
        json.dump({"config": config.to_dict(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
