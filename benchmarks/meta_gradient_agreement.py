"""How different are MIMA and imma-joint, really? The cosine between their meta-gradients on S^u.

    python benchmarks/meta_gradient_agreement.py [--model toy] [--concepts toy:stripes toy:checker toy:dots]
                                                 [--batches 3] [--out meta_gradient_agreement.json]

For each simulated attacker (whole UNet or cross-attention keys/values only; one or two unrolled inner steps),
both methods compute the gradient of their protection objective (the upper loss alone: no prior, no retain
term, which are the same in both) on the SAME batches, noise and timesteps, from the erased toy model. Printed
per attacker: the mean cosine between the two methods' gradients, and the same cosine between two draws of
noise for one method (how much the batches alone move the direction). A cosine near 1 where the noise floor is
lower means Merge does not change what the ascent does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ATTACKERS = {
    "whole UNet, 1 step": {"lower_params": ["*"], "inner_steps": 1, "inner_lr": 1.0},
    "whole UNet, 2 steps": {"lower_params": ["*"], "inner_steps": 2, "inner_lr": 1.0},
    "K/V only, 1 step": {"lower_params": ["*attn2.to_k.*", "*attn2.to_v.*"], "inner_steps": 1, "inner_lr": 10.0},
}


def _meta_gradient(immunizer, concepts, batch_seed: int, noise_seed: int, batch_size: int) -> torch.Tensor:
    batches_generator = torch.Generator().manual_seed(batch_seed)
    batches = {c.name: (c.batch(batch_size, batches_generator), c.batch(batch_size, batches_generator))
               for c in concepts}
    params = immunizer.trainable_parameters()
    objective, _ = immunizer.objective(batches, torch.Generator().manual_seed(noise_seed))
    grads = torch.autograd.grad(objective, list(params.values()))
    return torch.cat([g.flatten() for g in grads])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concepts", nargs="+", default=["toy:stripes", "toy:checker", "toy:dots"])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--out", default="meta_gradient_agreement.json")
    args = parser.parse_args()

    from mima.data.concepts import load_concepts, materialize
    from mima.data.encoding import encode_concept
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.immunize.erase import erase_targets
    from mima.models.components import Components

    base = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, caption_bank="toy")
    components = Components.from_pretrained(args.model)
    specs = [materialize(s, Path("runs/meta-gradient-data"), base.n_images) for s in load_concepts(args.concepts)]
    erase_targets(components, specs, base)
    concepts = [encode_concept(components, s, with_prior=False) for s in specs]
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for attacker, overrides in ATTACKERS.items():
        grads = {}
        for method in ("mima", "imma-joint"):
            config = base.with_overrides(method=method, **overrides)
            immunizer = immunizers.get(method)(config)
            immunizer.prepare(components, specs, concepts)
            grads[method] = [[_meta_gradient(immunizer, concepts, k, noise, config.batch_size) for noise in (0, 1)]
                             for k in range(args.batches)]
        between = [cos(m[0], j[0], dim=0).item() for m, j in zip(grads["mima"], grads["imma-joint"], strict=True)]
        floor = [cos(m[0], m[1], dim=0).item() for m in grads["mima"]]
        rows.append({"attacker": attacker, "cos_mima_vs_joint": sum(between) / len(between),
                     "cos_noise_floor": sum(floor) / len(floor), "per_batch": between})
        print(f"{attacker:22s} cos(mima, imma-joint) {rows[-1]['cos_mima_vs_joint']:.4f}   "
              f"cos(two noise draws) {rows[-1]['cos_noise_floor']:.4f}")
    Path(args.out).write_text(json.dumps({"concepts": args.concepts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
