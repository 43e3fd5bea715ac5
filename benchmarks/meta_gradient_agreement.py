"""How different are MIMA and imma-joint, really? The cosine between their meta-gradients on S^u.

    python benchmarks/meta_gradient_agreement.py [--model toy] [--concepts toy:stripes toy:checker toy:dots]
                                                 [--batches 3] [--out meta_gradient_agreement.json]
                                                 [--model IMMUNIZED_MODEL --already-erased]

For each simulated attacker (whole UNet or cross-attention keys/values only; one or two unrolled inner steps;
gradient clipped or not), three objectives compute the gradient of their protection term (the upper loss alone:
no prior, no retain term, which are the same in all) on the SAME batches, noise and timesteps, from the erased
toy model (or from `--model`): MIMA, imma-joint, and MIMA with its Merge replaced by the plain mean of the
copies ("mima no Merge"). Printed per attacker: the mean cosine between each pair, and the same cosine between
two draws of noise for MIMA (how much the batches alone move the direction). cos(mima, mima no Merge) near 1
where the noise floor is lower means Merge does not change what the ascent does; cos(mima no Merge, imma-joint)
below 1 then says that what separates MIMA from imma-joint is how the copies are made (for instance, clipped
one by one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

ATTACKERS = {
    "whole UNet, 1 step": {"lower_params": ["*"], "inner_steps": 1, "inner_lr": 1.0, "inner_clip": 0.0},
    "whole UNet, 1 step, clip 1": {"lower_params": ["*"], "inner_steps": 1, "inner_lr": 1.0, "inner_clip": 1.0},
    "whole UNet, 2 steps": {"lower_params": ["*"], "inner_steps": 2, "inner_lr": 1.0, "inner_clip": 0.0},
    "K/V only, 1 step": {"lower_params": ["*attn2.to_k.*", "*attn2.to_v.*"], "inner_steps": 1, "inner_lr": 10.0,
                         "inner_clip": 0.0},
}
OBJECTIVES = ("mima", "imma-joint", "mima no Merge")


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
    parser.add_argument("--already-erased", action="store_true",
                        help="the model's targets are erased already (an immunized model): start from it as it is")
    parser.add_argument("--out", default="meta_gradient_agreement.json")
    args = parser.parse_args()

    from mima.data.concepts import load_concepts, materialize
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.immunize.erase import erase_targets
    from mima.models.components import Components
    from mima.models.encoding import encode_concept

    base = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, caption_bank="toy")
    components = Components.from_pretrained(args.model)
    specs = [materialize(s, Path("runs/meta-gradient-data"), base.n_images) for s in load_concepts(args.concepts)]
    if not args.already_erased:
        erase_targets(components, specs, base)
    concepts = [encode_concept(components, s, with_prior=False) for s in specs]
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for attacker, overrides in ATTACKERS.items():
        grads = {}
        for objective in OBJECTIVES:
            method = objective.removesuffix(" no Merge")
            config = base.with_overrides(method=method, **overrides)
            immunizer = immunizers.get(method)(config)
            immunizer.prepare(components, specs, concepts)
            if objective.endswith("no Merge"):  # every adapted parameter, keys and values too, averaged
                immunizer.plan = dataclasses.replace(immunizer.plan, key_value_names=frozenset())
            grads[objective] = [[_meta_gradient(immunizer, concepts, k, noise, config.batch_size) for noise in (0, 1)]
                                for k in range(args.batches)]
        row = {"attacker": attacker}
        for a, b in (("mima", "imma-joint"), ("mima", "mima no Merge"), ("mima no Merge", "imma-joint")):
            row[f"cos({a}, {b})"] = [cos(x[0], y[0], dim=0).item() for x, y in zip(grads[a], grads[b], strict=True)]
        row["cos(two noise draws, mima)"] = [cos(m[0], m[1], dim=0).item() for m in grads["mima"]]
        rows.append(row)
        print(attacker + ": " + "   ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in row.items() if k != "attacker"))
    Path(args.out).write_text(json.dumps({"concepts": args.concepts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
