"""How faithfully models draw toy concepts before any attack, by the number of sampling steps.

A benchmark scores the models before any attack at one step count; an immunization can leave a concept drawn at 25
DDIM steps and broken at the demo's 10, and the toy judge, which names the closest concept, counts noise in a
concept's colours as that concept. This samples each concept's own prompt at each step count and prints
efficientnet-lite0's S to the toy references beside the judge's rate:

    python benchmarks/drawn_before_attack.py toy runs/demo/models/mima/model --concepts waves --steps 10 25

`toy` is the shipped model (un-immunized, so not the erased reference of a relearn benchmark:
runs/<benchmark>/models/none/model is). Images of a (model, concept) share their noise across step counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image

from mima.data.concepts import toy_concept_spec
from mima.data.image_folder import read_image_folder
from mima.errors import MimaError
from mima.evaluate.encoders import get_encoder
from mima.evaluate.evaluate import write_toy_references
from mima.evaluate.metrics import similarity
from mima.models.components import Components
from mima.sampling import sample_images


def drawn(models: list[str], concepts: list[str], steps: list[int], n_images: int) -> list[dict]:
    efficientnet, judge = get_encoder("efficientnet-lite0"), get_encoder("toy-judge")
    with tempfile.TemporaryDirectory() as folder:
        folders = write_toy_references(concepts, folder)
        references = {c: efficientnet.embed(read_image_folder(path)[0]) for c, path in folders.items()}
    rows = []
    for model in models:
        components = Components.from_pretrained(model)
        for concept in concepts:
            prompt = toy_concept_spec(concept).prompts[0]
            for step_count in steps:
                images = [Image.fromarray(x) for x in sample_images(components, [prompt] * n_images, steps=step_count)]
                rate = judge.success_rate(judge.predict_labels(images), concept)
                rows.append({"model": model, "concept": concept, "steps": step_count, "prompt": prompt,
                             "similarity": similarity(efficientnet.embed(images), references[concept]),
                             "judge_rate": rate})
                print(f"{model} | {concept} | {step_count} steps | S {rows[-1]['similarity']:.3f} | "
                      f"judge {100 * rate:.0f} %", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="'toy' or diffusers folders, e.g. runs/demo/models/mima/model")
    parser.add_argument("--concepts", nargs="+", default=["waves"], help="toy concepts (default: waves)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25], help="DDIM step counts (default: 10 25)")
    parser.add_argument("--images", type=int, default=32, help="samples per (model, concept, steps) (default: 32)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    try:
        for concept in args.concepts:
            toy_concept_spec(concept)
        rows = drawn(args.models, args.concepts, args.steps, args.images)
    except MimaError as e:
        parser.error(str(e))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
