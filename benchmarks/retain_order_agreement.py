"""How much of the retain term's gradient comes through its simulated attack's steps?

    python benchmarks/retain_order_agreement.py [--json retain_order_agreement.json] [IMMUNIZE_ARGS ...]

Runs `mima immunize` with IMMUNIZE_ARGS (default: the demo's three targets on the toy model with the shipped
defaults, into a temporary folder; about 4 minutes on one core) and, at each outer step, takes the retain term's
gradient on S^u twice on the same batches, noise and timesteps: through the attack (`retain_order: attacker`, the
run's) and in first order (`retain_order: first-order`, the attack's steps taken as constants). Prints, per step, the
prompt of the step's simulated attacker, the cosine between the two and |g_attacker - g_first| / |g_attacker|, then
their ranges; writes them as JSON. The run itself goes on with the gradient it would have used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

DEMO = ["--model", "toy", "--concepts", "toy:stripes,toy:checker,toy:dots"]


def _flat(grads: dict[str, torch.Tensor], names: list[str], like: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(grads[n] if n in grads else torch.zeros_like(like[n])).flatten() for n in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="retain_order_agreement.json")
    args, immunize_args = parser.parse_known_args()

    from mima.cli import main as mima
    from mima.immunize.preservation import PreservationTerms

    rows = []
    terms = PreservationTerms.preservation_gradients

    def both_orders(self, base, batches, generator):
        before = generator.get_state()
        used = dict(terms(self, base, batches, generator))
        after, config = generator.get_state(), self.config
        generator.set_state(before)
        self.config = config.with_overrides(retain_order="first-order")
        try:
            first = dict(terms(self, base, batches, generator))["retain"][1]
        finally:
            self.config = config
            generator.set_state(after)
        names = sorted(self.upper_names)
        through, first = _flat(used["retain"][1], names, base), _flat(first, names, base)
        rows.append({"attacker_prompt": self.attacker.prompt_mode,
                     "cosine": torch.nn.functional.cosine_similarity(through, first, dim=0).item(),
                     "relative_difference": ((through - first).norm() / through.norm()).item()})
        print(json.dumps(rows[-1]), file=sys.stderr)
        yield from used.items()

    PreservationTerms.preservation_gradients = both_orders
    with tempfile.TemporaryDirectory() as out:
        out_args = [] if "--out" in immunize_args else ["--out", out]
        if status := mima(["immunize", *(immunize_args or DEMO), *out_args]):
            raise SystemExit(status)
    if not rows:
        raise SystemExit("the run took no outer step with a retain term (retain_weight 0, or no class images?)")
    for key in ("cosine", "relative_difference"):
        values = [row[key] for row in rows]
        print(f"{key}: {min(values):.4f} to {max(values):.4f} (mean {sum(values) / len(values):.4f}, "
              f"{len(values)} outer steps)")
    Path(args.json).write_text(json.dumps({"immunize_args": immunize_args or DEMO, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
