"""How much each simulated attacker learns: the fall of its loss on held-out images of the concept after its steps.

For each kind, learning rate and number of steps: start each concept's attack from phi_0 on one batch of its
images, then compare the loss at phi_0 and at the adapted phi on another batch of the concept (other images, other
noise and timesteps, the same for both), under the attacker's own prompt. Positive: the attack re-learns the
concept beyond the batch it stepped on. The model is the released one (no erasure, no immunization):

    python benchmarks/simulated_attackers.py [--model toy] [--kinds textual-inversion custom-diffusion]
        [--lrs 0.3 1 3] [--steps 1 5] [--concepts toy:stripes toy:star] [--seeds 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mima.data.concepts import load_concepts, materialize
from mima.immunize import ImmunizeConfig, immunizers
from mima.models.components import Components
from mima.models.encoding import encode_concept


def held_out_falls(immunizer, encoded, seeds: int, batch_size: int = 4) -> list[float]:
    """The relative fall of the loss on a held-out batch of each concept, after an attack on another batch."""
    base = {name: p.detach() for name, p in immunizer.base_parameters().items()}
    falls = []
    for seed in range(seeds):
        for n, concept in enumerate(encoded):
            lower = concept.batch(batch_size, torch.Generator().manual_seed(100 + seed))
            held = concept.batch(2 * batch_size, torch.Generator().manual_seed(200 + seed))
            run = immunizer.unroll(base, [lower], [n], torch.Generator().manual_seed(seed), keep_last=False)
            start = immunizer.attacker.start(base, [n], torch.Generator().manual_seed(seed))
            with torch.no_grad():
                before, after = (immunizer.attacked_loss({**base, **phi}, held, torch.Generator().manual_seed(300), n)
                                 for phi in (start, run.params))
                falls.append((before.item() - after.item()) / before.item())
    return falls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--kinds", nargs="+", default=["textual-inversion", "custom-diffusion"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--concepts", nargs="+", default=["toy:stripes", "toy:star"])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    components = Components.from_pretrained(args.model)
    data = Path(tempfile.mkdtemp(prefix="simulated-attackers-"))
    specs = [materialize(s, data, 8, seed=i) for i, s in enumerate(load_concepts(args.concepts))]
    encoded = [encode_concept(components, s, with_prior=False) for s in specs]
    caption_bank = ImmunizeConfig().for_model(args.model).caption_bank
    print(f"{'kind':18s} {'lr':>5s} {'steps':>5s}  held-out loss fall: mean (min) over {args.seeds * len(specs)}")
    for kind in args.kinds:
        for lr in args.lrs:
            for steps in args.steps:
                config = ImmunizeConfig(caption_bank=caption_bank, prior_weight=0.0, retain_weight=0.0,
                                        attackers=({"kind": kind, "lr": lr, "steps": steps},))
                immunizer = immunizers.get(config.method)(config)
                immunizer.prepare(components, specs, encoded)
                falls = held_out_falls(immunizer, encoded, args.seeds)
                print(f"{kind:18s} {lr:5.2g} {steps:5d}  {100 * sum(falls) / len(falls):6.2f} % "
                      f"({100 * min(falls):.2f} %)", flush=True)


if __name__ == "__main__":
    main()
