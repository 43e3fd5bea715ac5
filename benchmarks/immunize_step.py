"""Time and peak memory of one outer immunization step against plain fine-tuning, as the number of concepts grows.

Each (method, N) runs in its own subprocess, so its peak memory is its own:

- CPU: the peak resident set size (RSS) of the child process (`ru_maxrss`, which includes the model and the
  Python runtime), and the peak RSS growth during the steps above the RSS once model and data are loaded
  (sampled from /proc/self/statm every 2 ms; what the steps themselves cost).
- CUDA: the allocator's peak during the steps (`torch.cuda.max_memory_allocated`, via mima.utils.device), model
  included, and that peak less what was allocated before them (what the steps themselves cost).

Ratios come from this one run: step time / (N x plain fine-tuning step time on the same model and batch size,
timed in the same child right after, so that both see the same load on a shared machine; each the fastest of its
timed steps),
the Merge's share of a step (adding the copies, the closed-form solve and its pull-back), peak memory at N
over peak memory at the smallest N, and how many batches at one set of weights went through the UNet in one call
(`fused`, `--fused-batches`). Prints a table and writes JSON:

    python benchmarks/immunize_step.py [--model toy|sd15-shaped|sd15-half-width|FOLDER] [--concepts 1 3 8 16]
        [--steps 2] [--methods mima-2nd mima-1st imma-joint imma-each] [--batch-size 4] [--device cpu]
        [--mixed-precision no|bf16] [--threads 1]
        [--gradient-checkpointing] [--with-prior] [--kept-gradients F] [--fused-batches F]
        [--retain-order attacker|first-order]
        [--json benchmarks/results/immunize_step.json]

With `--immunize-config FILE` (an immunize YAML such as configs/attackers-lora.yaml: its `attackers:` list, e.g. the
distribution a run would sample from, and any other `ImmunizeConfig` field it sets, e.g. `upper_params`; or
`defaults`: the shipped defaults), it measures instead, in each child, an outer step with the `--baseline` settings
(default configs/attackers-full.yaml: one `full` SGD step, the defaults before the robust study, which the cost bar
of issue 18 is relative to) and a step with the file's settings for each attacker of its distribution, interleaved
so that all see the same machine load, and prints the expected step time under the distribution (each attacker's
time weighted by its sampling weight) over the baseline step's (bar: at most 2); then, each alone in its own child,
the peak memory of the two settings' steps and its ratio.

`sd15-shaped` is the small random pipeline with Stable Diffusion 1.5's structure from tests/sd_shaped.py;
`sd15-half-width` the same with SD 1.5's UNet at half its width (220M parameters), whose step memory on its small
latents is mostly parameter-sized tensors.
By default the objective is the core bi-level one (no class images); `--with-prior` adds class images so that
the prior-preservation, retain and bank prior terms, at their configured weights, are paid for too (the bank
prior's images: eight random latents under the first concept's class prompt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import peaks, seconds_per_step, time_calls

REPO = Path(__file__).resolve().parents[1]
BARS = {"peak_ratio": {8: 1.5, 16: 2.0}, "time_per_concept": 4.0, "merge_share": 0.05}
_SYLLABLES = ("zor", "blax", "quen", "vel", "trin", "osk", "mur", "daph", "kel", "yth", "rond", "pim")


def _model_dir(model: str) -> str:
    if model not in ("sd15-shaped", "sd15-half-width"):
        return model
    sys.path.insert(0, str(REPO / "tests"))
    import sd_shaped

    out = Path(tempfile.mkdtemp()) / model
    if model == "sd15-shaped":
        return str(sd_shaped.build_sd15_shaped(out))
    return str(sd_shaped.build_sd15_wide(out, channels=sd_shaped.SD15_HALF_CHANNELS))


def _specs(model: str, n: int) -> list:
    """N concepts: toy concepts on the toy model, invented multi-token names (as rare words are) otherwise."""
    from mima.data.concepts import ConceptSpec, toy_concept_spec
    from mima.toy.world import toy_concepts

    if model == "toy":
        return [toy_concept_spec(c.name) for c in toy_concepts()[:n]]
    names = [(_SYLLABLES[i % 12] + _SYLLABLES[(7 * (i // 12) + i % 12 + 1) % 12]).capitalize() for i in range(n)]
    return [ConceptSpec(name.lower(), (f"a painting in the style of {name}", f"{name} style artwork"),
                        class_prompt="a painting") for name in names]


def _random_concepts(components, specs, with_prior: bool, g) -> list:
    """Eight random latents per concept (and per class, with the prior) under the concept's encoded prompt."""
    from mima.models.encoding import EncodedConcept

    return [EncodedConcept(s.name, _images(components, s.prompt, g),
                           _images(components, s.class_prompt, g) if with_prior else None) for s in specs]


def _images(components, prompt: str, g):
    """Eight random latents under `prompt`, encoded."""
    import torch

    from mima.models.encoding import EncodedImages

    size = components.unet.config.sample_size
    latents = torch.randn(8, 4, size, size, generator=g)
    hidden = components.encode_prompts([prompt] * 8).detach().cpu()
    return EncodedImages(latents, torch.zeros_like(latents), hidden, [prompt] * 8)  # token attackers


def _with_bank_prior(immunizer, components, caption: str, g, device) -> None:
    """Where the settings turn the bank prior on, its images (random latents under `caption`), the unconditional
    conditioning and, for the distillation, its teacher, as the immunize trainer sets them."""
    from mima.immunize.trainer import distillation_teacher, give_bank_prior

    if immunizer.config.uses_bank_prior:
        bank = _images(components, caption, g)
        give_bank_prior(immunizer, components,
                        type(bank)(bank.mean.to(device), bank.std.to(device), bank.hidden.to(device), bank.prompts))
        immunizer.original = distillation_teacher(components, immunizer)


def _immunizer(args: argparse.Namespace, components, specs, concepts, g, device):
    """The immunizer of `--methods` entry `args.child` (mima-2nd, mima-1st, imma-joint, imma-each), prepared."""
    from mima.immunize import ImmunizeConfig, immunizers

    config = ImmunizeConfig(
        order="first-order" if args.child == "mima-1st" else "second-order",
        caption_bank="toy" if args.model == "toy" else "generic",
        gradient_checkpointing=args.gradient_checkpointing, **_terms(args),
        **{name: value for name in ("hvp", "kept_gradients", "fused_batches", "retain_order")
           if (value := getattr(args, name)) is not None},
    )
    immunizer = immunizers.get(args.child.removesuffix("-2nd").removesuffix("-1st"))(config)
    immunizer.prepare(components, specs, concepts)
    _with_bank_prior(immunizer, components, specs[0].class_prompt, g, device)
    return immunizer


def _measure(args: argparse.Namespace) -> dict[str, float]:
    """Run in the child process: seconds per step (after one warm-up), Merge seconds, peak memory."""
    import torch

    from mima.merge.plan import MergeInputs
    from mima.models.components import Components
    from mima.utils.device import resolve_device

    device = resolve_device(args.device)
    components = Components.from_pretrained(args.model_dir)
    components.unet.to(device)
    specs = _specs(args.model, args.n)
    g = torch.Generator().manual_seed(0)
    concepts = _random_concepts(components, specs, args.with_prior, g)

    def to_device(batch):
        prior = tuple(t.to(device) for t in batch.prior) if batch.prior is not None else None
        return type(batch)(batch.latents.to(device), batch.hidden.to(device), prior, batch.prompts, batch.images)

    if args.immunize_config:
        return _distribution_cost(args, components, specs, concepts, g, to_device)
    merge_seconds: list[float] = []
    if args.child == "finetune":
        step = _finetune_step(components, concepts[0], args.batch_size, g, to_device)
    else:
        immunizer = _immunizer(args, components, specs, concepts, g, device)
        for method in ("add", "merge", "pull_back"):
            time_calls(MergeInputs, method, merge_seconds, device)
        step = _outer_step(immunizer, concepts, args.batch_size, g, to_device)

    timed = {}

    def steps() -> None:
        step()  # warm-up: first-call allocations and kernel selection
        merge_seconds.clear()
        timed["step_s"] = seconds_per_step(step, args.steps, device)

    result = {**peaks(steps, device), "step_s": timed["step_s"], "merge_s": sum(merge_seconds) / args.steps}
    if args.child != "finetune":  # plain steps right after, in this process: the ratio sees the same machine load
        plain = _finetune_step(components, concepts[0], args.batch_size, g, to_device)
        plain()
        result["plain_step_s"] = seconds_per_step(plain, max(args.steps, 3), device)
        result["fused"] = immunizer.fused
    return result


def _distribution_cost(args: argparse.Namespace, components, specs, concepts, g, to_device) -> dict:
    """Seconds of an outer step with the baseline settings and of a step with each attacker of
    `args.immunize_config`'s settings, interleaved; or (child `peak-...`) one setting's peak memory."""
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.utils.device import resolve_device

    method = args.child.removeprefix("peak-default-").removeprefix("peak-config-")

    def immunizer_step(config):
        immunizer = immunizers.get(method.removesuffix("-2nd").removesuffix("-1st"))(config)
        immunizer.prepare(components, specs, concepts)
        _with_bank_prior(immunizer, components, specs[0].class_prompt, g, resolve_device(args.device))
        outer_step = _outer_step(immunizer, concepts, args.batch_size, g, to_device)

        def step(index: int) -> None:
            immunizer.distribution.index = index  # as `sample_attacker` would choose it
            outer_step()

        return immunizer, step

    shipped = ImmunizeConfig(order="first-order" if method.endswith("-1st") else "second-order",
                             caption_bank="toy" if args.model == "toy" else "generic",
                             gradient_checkpointing=args.gradient_checkpointing)
    default = shipped.with_overrides(**{**_settings(args.baseline), **_terms(args)})
    compared = shipped.with_overrides(**{**_settings(args.immunize_config), **_terms(args)})
    if args.child.startswith("peak-"):  # one setting alone in this process: its peak memory is its own
        sampled, step = immunizer_step(compared if args.child.startswith("peak-config") else default)
        attackers = range(len(sampled.distribution.attackers))
        return peaks(lambda: [step(i) for _ in range(2) for i in attackers], resolve_device(args.device))
    _, default_step = immunizer_step(default)
    sampled, distribution_step = immunizer_step(compared)
    weights = [a.spec.weight for a in sampled.distribution.attackers]
    runs = [lambda: default_step(0)] + [lambda i=i: distribution_step(i) for i in range(len(weights))]
    seconds = [0.0] * len(runs)
    for run in runs:
        run()  # warm-up
    device = resolve_device(args.device)
    for _ in range(args.steps):
        for index, run in enumerate(runs):
            seconds[index] += seconds_per_step(run, 1, device) / args.steps
    expected = sum(w * t for w, t in zip(weights, seconds[1:], strict=True)) / sum(weights)
    return {"default_step_s": seconds[0], "attacker_step_s": seconds[1:], "weights": weights,
            "distribution_step_s": expected, "ratio": expected / seconds[0],
            "attackers": [a.spec.to_dict() for a in sampled.distribution.attackers], "settings": compared.to_dict()}


def _settings(path: str) -> dict:
    """The ImmunizeConfig fields an immunize YAML sets; none for 'defaults'."""
    import yaml

    return {} if path == "defaults" else yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _terms(args: argparse.Namespace) -> dict[str, float]:
    """The preservation terms (prior, retain, bank prior): at the configured weights with class images
    (`--with-prior`), else off."""
    return {} if args.with_prior else {"prior_weight": 0.0, "retain_weight": 0.0, "bank_prior_weight": 0.0}


def _print_distribution_costs(args: argparse.Namespace, model_dir: str) -> list[dict]:
    print(f"cost of the settings in {args.immunize_config} against those in {args.baseline} ({args.model}, batch "
          f"{args.batch_size}, {args.device}, {args.steps} interleaved steps each; a shared machine is noisy)")
    rows = []
    for method in args.methods:
        for n in sorted(args.concepts):
            r = _run_child(args, model_dir, method, n)
            default_peak = _run_child(args, model_dir, f"peak-default-{method}", n)
            config_peak = _run_child(args, model_dir, f"peak-config-{method}", n)
            key = "step_peak_bytes" if default_peak["step_peak_bytes"] else "peak_bytes"
            memory = config_peak[key] / default_peak[key]
            rows.append({"method": method, "n": n, **r, "default_peak": default_peak, "config_peak": config_peak,
                         "memory_ratio": memory})
            each = ", ".join(f"{t:.3f}" for t in r["attacker_step_s"])
            print(f"N={n} {method}: baseline {r['default_step_s']:.3f} s, distribution "
                  f"{r['distribution_step_s']:.3f} s (each attacker: {each} s) -> ratio {r['ratio']:.2f} (bar <= 2);"
                  f" peak memory of its steps {config_peak[key] / 2**20:.0f} MiB against"
                  f" {default_peak[key] / 2**20:.0f} MiB -> {memory:.2f}")
    return rows


def _outer_step(immunizer, concepts, batch_size: int, g, to_device):
    """One outer step of `immunizer` on fresh batches of `concepts`: its gradients, then AdamW on S^u."""
    import torch

    params = immunizer.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)

    def step() -> None:
        batches = {c.name: (to_device(c.batch(batch_size, g)), to_device(c.batch(batch_size, g))) for c in concepts}
        _, grads, _ = immunizer.gradients(batches, g)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad()

    return step


def _finetune_step(components, concept, batch_size: int, g, to_device):
    """Plain fine-tuning of the whole UNet (AdamW), the unit step times are measured in."""
    import torch

    from mima.losses import diffusion_loss, unet_caller

    unet = components.unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step() -> None:
        batch = to_device(concept.batch(batch_size, g))
        diffusion_loss(unet_caller(unet), components.scheduler, batch.latents, batch.hidden, generator=g).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _run_child(args: argparse.Namespace, model_dir: str, method: str, n: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--model", args.model, "--model-dir", model_dir, "--child", method,
               "--n", str(n), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--device", args.device, "--mixed-precision", args.mixed_precision,
               *(["--immunize-config", str(args.immunize_config), "--baseline", str(args.baseline)]
                 if args.immunize_config else []),
               *(["--with-prior"] if args.with_prior else []), *(["--hvp", args.hvp] if args.hvp else []),
               *(["--kept-gradients", str(args.kept_gradients)] if args.kept_gradients is not None else []),
               *(["--fused-batches", str(args.fused_batches)] if args.fused_batches is not None else []),
               *(["--retain-order", args.retain_order] if args.retain_order else []),
               *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{method} at N = {n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy",
                        help="'toy', 'sd15-shaped', 'sd15-half-width' (SD 1.5's UNet at half width: parameter-sized "
                             "tensors dominate a step's memory) or a diffusers folder")
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 3, 8, 16])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="forward passes under autocast in bf16, as `mima immunize --mixed-precision bf16`")
    parser.add_argument("--methods", nargs="+", default=["mima-2nd"],
                        choices=["mima-2nd", "mima-1st", "imma-joint", "imma-each"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--with-prior", action="store_true", help="class images: prior and retain terms on")
    parser.add_argument("--hvp", choices=["exact", "finite-difference"], help="second order's Hessian-vector "
                        "product (default: ImmunizeConfig's)")
    parser.add_argument("--kept-gradients", type=float, help="fraction of the peak memory the copies' inner "
                        "gradients may keep for their products (default: ImmunizeConfig's; 0: recompute them)")
    parser.add_argument("--fused-batches", type=float, help="batches at one set of weights go through the UNet "
                        "together while their graph fits in this many times the UNet's parameters (default: "
                        "ImmunizeConfig's; 0: one at a time)")
    parser.add_argument("--retain-order", choices=["attacker", "first-order"], help="the retain term's gradient "
                        "through its attack or in first order (default: ImmunizeConfig's; with --with-prior)")
    parser.add_argument("--immunize-config",
                        help="immunize YAML (attackers, upper_params, ...) or 'defaults': print its step time and "
                             "peak memory over the baseline's")
    parser.add_argument("--baseline", default=str(REPO / "configs" / "attackers-full.yaml"),
                        help="immunize YAML the --immunize-config settings are compared with")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser


def _write_json(args: argparse.Namespace, record: dict) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "n", "json")}
    args.json.write_text(json.dumps({"settings": settings, **record}, indent=2, sort_keys=True, default=str) + "\n")


def _print_scaling(args: argparse.Namespace, model_dir: str) -> dict:
    """Each method's step at each N against the plain fine-tuning step: the table, and the record for --json."""
    plain = _run_child(args, model_dir, "finetune", 1)
    print(f"plain fine-tuning step ({args.model}, batch {args.batch_size}, {args.device}): {plain['step_s']:.3f} s, "
          f"peak {plain['peak_bytes'] / 2**20:.0f} MiB")
    smallest = f"x N={min(args.concepts)}"
    print(f"{'N':>3} {'method':>10} {'step s':>8} {'/ N plain':>10} {'merge %':>8} {'peak MiB':>9} {smallest:>7}"
          f" {'step MiB':>9} {'x':>6} {'fused':>5}")
    rows = []
    for method in args.methods:
        first = None
        for n in sorted(args.concepts):
            r = _run_child(args, model_dir, method, n)
            first = first or r
            row = {"method": method, "n": n, **r, "per_concept": r["step_s"] / (n * r["plain_step_s"]),
                   "merge_share": r["merge_s"] / r["step_s"], "peak_ratio": r["peak_bytes"] / first["peak_bytes"],
                   "step_peak_ratio": r["step_peak_bytes"] / max(first["step_peak_bytes"], 1)}
            rows.append(row)
            print(f"{n:>3} {method:>10} {r['step_s']:>8.3f} {row['per_concept']:>10.2f}"
                  f" {100 * row['merge_share']:>7.1f}% {r['peak_bytes'] / 2**20:>9.0f} {row['peak_ratio']:>7.2f}"
                  f" {r['step_peak_bytes'] / 2**20:>9.0f} {row['step_peak_ratio']:>6.2f} {r['fused']:>5}")
    print(f"bars (second order): peak x N=1 <= {BARS['peak_ratio']}, step / N plain <= {BARS['time_per_concept']}, "
          f"merge < {100 * BARS['merge_share']:.0f} %")
    return {"plain": plain, "rows": rows, "bars": BARS}


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        import torch

        from mima.utils.device import resolve_placement

        torch.set_num_threads(args.threads)
        with resolve_placement(args.device, args.mixed_precision, loss_scaling=False).autocast():
            print(json.dumps(_measure(args)))
        return
    model_dir = _model_dir(args.model)
    if args.immunize_config:
        record = {"rows": _print_distribution_costs(args, model_dir)}
    else:
        record = _print_scaling(args, model_dir)
    if args.json:
        _write_json(args, record)


if __name__ == "__main__":
    main()
