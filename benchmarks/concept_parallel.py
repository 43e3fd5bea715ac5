"""Outer-step time of a concept-parallel MIMA immunization: P processes of one thread each against one process of
one thread, on the same concepts, batches and draws (the processes split the concepts, `mima.utils.distributed`).

    python benchmarks/concept_parallel.py [--model toy] [--concepts 8] [--processes 2] [--steps 3]

Prints the mean seconds per outer step (after one warm-up step) of each and their ratio, measured in this one run.
The bar (issue 19): two processes at most 0.65x one process at N = 8 on a 2-core machine. The objective is the
core bi-level one (no class images), as in benchmarks/immunize_step.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp

BAR = 0.65


def _step_seconds(rank: int, size: int, port: int, args: argparse.Namespace, results: dict) -> None:
    """In each process: join the group (P > 1), prepare MIMA on N toy concepts and time its outer steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mima.data.concepts import toy_concept_spec
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.models.components import Components
    from mima.models.encoding import EncodedConcept, EncodedImages
    from mima.toy.world import toy_concepts
    from mima.utils.device import step_generator
    from mima.utils.distributed import join_process_group

    shard = join_process_group(torch.device("cpu"))
    components = Components.from_pretrained(args.model)
    specs = [toy_concept_spec(c.name) for c in toy_concepts()[: args.concepts]]
    size_px, g = components.unet.config.sample_size, torch.Generator().manual_seed(0)
    concepts = []
    for spec in specs:
        latents = torch.randn(8, 4, size_px, size_px, generator=g)
        hidden = components.encode_prompts([spec.prompt] * 8).detach()
        concepts.append(EncodedConcept(spec.name, EncodedImages(latents, torch.zeros_like(latents), hidden), None))
    immunizer = immunizers.get("mima")(ImmunizeConfig(caption_bank="toy", prior_weight=0.0, retain_weight=0.0))
    immunizer.shard = shard
    immunizer.prepare(components, specs, concepts)
    params = immunizer.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)

    def step(k: int) -> None:
        generator = step_generator(0, k)
        batches = {c.name: (c.batch(4, generator), c.batch(4, generator)) for c in concepts}
        _, grads, _ = immunizer.gradients(batches, generator)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad()

    step(0)  # warm-up
    shard.barrier()
    start = time.perf_counter()
    for k in range(1, args.steps + 1):
        step(k)
    if shard.is_main:
        results[size] = (time.perf_counter() - start) / args.steps
    if size > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    results = mp.Manager().dict()
    for size in (1, args.processes):
        mp.spawn(_step_seconds, args=(size, _free_port(), args, results), nprocs=size, join=True)
    one, many = results[1], results[args.processes]
    ratio = many / one
    print(f"N = {args.concepts}, mima second order, one thread per process")
    print(f"1 process:  {one:.3f} s/step")
    print(f"{args.processes} processes: {many:.3f} s/step")
    print(f"ratio {ratio:.3f} (bar <= {BAR}: {'met' if ratio <= BAR else 'NOT met'})")


if __name__ == "__main__":
    main()
