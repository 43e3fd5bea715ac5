"""Does a simulated attacker learn? Its loss before and after its inner steps, for several learning rates.

On the toy model (or a diffusers folder), in the relearn setting (targets erased first, as `mima immunize` does) or
personalize, each target's copy is adapted as MIMA adapts it; the loss of the UNet weights it makes is taken at
16 fixed noise draws on the batch it trained on and on a held-out batch of the same concept, under the prompt the
attacker trains with (a token attacker's token at its start, then adapted). In relearn, the unerased model's loss on
the trained batch says how much there is to re-learn:

    python benchmarks/inner_loss.py [--kind lora] [--lrs 1 3 10] [--steps 1 5] [--setting relearn|personalize]
        [--model toy] [--concepts toy:stripes,toy:checker,toy:dots] [--clip 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mima.data.concepts import load_concepts_arg, materialize
from mima.functional import Params
from mima.immunize import ImmunizeConfig, immunizers
from mima.immunize.erase import erase_targets
from mima.models.components import Components
from mima.models.encoding import Batch, encode_concept

DRAWS = 16


def fixed_noise_loss(immunizer, weights: Params, phi: Params, batch: Batch, concept: int) -> float:
    """The mean diffusion loss of `batch` (of concept index `concept`) over DRAWS fixed noise and timestep draws,
    with the UNet weights `weights`, conditioned as the attacker conditions it at `phi`."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(immunizer.conditioned_loss(weights, {**weights, **phi}, batch, generator, concept).item()
                   for _ in range(DRAWS)) / DRAWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="lora")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--setting", choices=["relearn", "personalize"], default="relearn")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concepts", default="toy:stripes,toy:checker,toy:dots")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(tempfile.mkdtemp())
    specs = [materialize(s, data, 32, seed=i) for i, s in enumerate(load_concepts_arg(args.concepts))]
    components = Components.from_pretrained(args.model)
    config = ImmunizeConfig(setting=args.setting, prior_weight=0.0, retain_weight=0.0).for_model(args.model)
    encoded = [encode_concept(components, s, with_prior=False) for s in specs]
    unerased = {n: p.detach().clone() for n, p in components.unet.named_parameters()}
    if args.setting == "relearn":
        erase_targets(components, specs, config)
    print(f"{args.kind} on {args.model}, {args.setting}, {len(specs)} targets, batches of 4, mean over targets "
          f"of the loss at {DRAWS} fixed noise draws:")
    for steps in args.steps:
        for lr in args.lrs:
            attacker = {"kind": args.kind, "lr": lr, "steps": steps, "clip": args.clip}
            immunizer = immunizers.get("mima")(config.with_overrides(attackers=(attacker,)))
            immunizer.prepare(components, specs, encoded)
            row = _adapted_losses(immunizer, encoded, unerased)
            change = {k: 100 * (row[f"{k} after"] / row[f"{k} before"] - 1) for k in ("trained", "held-out")}
            print(f"lr {lr:<6g} steps {steps:<3} trained batch {row['trained before']:.4f} -> "
                  f"{row['trained after']:.4f} ({change['trained']:+.1f} %), held-out {row['held-out before']:.4f} -> "
                  f"{row['held-out after']:.4f} ({change['held-out']:+.1f} %), unerased model "
                  f"{row['unerased']:.4f}; first gradient norm {row['gradient norm']:.3g}", flush=True)


def _adapted_losses(immunizer, encoded, unerased: Params) -> dict[str, float]:
    """Mean over targets of the losses before and after each target's attack, the unerased model's, and the
    norm of the attack's first gradient."""
    base = {n: p.detach() for n, p in immunizer.base_parameters().items()}
    generator, rows = torch.Generator().manual_seed(0), []
    attacker = immunizer.attacker
    for n, concept in enumerate(encoded):
        trained, held_out = concept.batch(4, generator), concept.batch(4, generator)
        start = attacker.start(base, [n], torch.Generator().manual_seed(n))  # a token at its init word
        run = immunizer.unroll(base, [trained], [n], generator, keep_last=False)
        adapted, phi = {**base, **attacker.weights({**base, **run.params})}, run.params
        rows.append({
            "trained before": fixed_noise_loss(immunizer, base, start, trained, n),
            "trained after": fixed_noise_loss(immunizer, adapted, phi, trained, n),
            "held-out before": fixed_noise_loss(immunizer, base, start, held_out, n),
            "held-out after": fixed_noise_loss(immunizer, adapted, phi, held_out, n),
            "unerased": fixed_noise_loss(immunizer, {**base, **unerased}, start, trained, n),
            "gradient norm": sum((g * g).sum() for g in run.gradients[0].values()).sqrt().item(),
        })
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


if __name__ == "__main__":
    main()
