"""Class images free of the targets: the base model's own images for a class prompt, less those the toy judge names
as a target, for the prior and retain terms of toy targets that would otherwise learn from images of other targets.

The base model's 32 class images for "a photo of an object" are 13 squares, 13 triangles, 4 stars, a heart and an
arrow by the toy judge, so an immunization against square and star asks the model to keep drawing both under the class
prompt. This draws the class prompt's images as the benchmark does (seed 0, then on), keeps the first `--images` that
the judge names as none of `--exclude`, and writes them as an image folder that a toy target names as its own:

    python benchmarks/target_free_class_images.py "a photo of an object" runs/class-images/objects \\
        --exclude circle crescent cross star square
    # targets: [{name: "toy:square", class_images: runs/class-images/objects}, ...]

Image i of the draw is the benchmark's image i wherever it is kept (same seed, noise by index).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from mima.data.concepts import toy_concept_spec
from mima.data.image_folder import write_image_folder
from mima.errors import ConfigError, MimaError
from mima.evaluate.encoders import get_encoder
from mima.models.components import Components
from mima.sampling import sample_images


def target_free_images(model: str, class_prompt: str, exclude: list[str], n_images: int,
                       draws: int = 128) -> tuple[list, dict[str, int]]:
    """The first `n_images` of the model's images for `class_prompt` that the toy judge names as none of `exclude`,
    and how many of the drawn images it named as each excluded concept."""
    judge, components = get_encoder("toy-judge"), Components.from_pretrained(model)
    drawn = sample_images(components, [class_prompt] * draws, desc="class images")
    labels = judge.predict_labels([Image.fromarray(image) for image in drawn])
    depicted = {c: [bool(judge.success_rate(labels[i : i + 1], c)) for i in range(len(drawn))] for c in exclude}
    kept = [image for i, image in enumerate(drawn) if not any(depicted[c][i] for c in exclude)]
    if len(kept) < n_images:
        raise ConfigError(f"only {len(kept)} of {draws} images of '{class_prompt}' are free of {exclude}")
    return kept[:n_images], {c: sum(flags) for c, flags in depicted.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("class_prompt", help='e.g. "a photo of an object"')
    parser.add_argument("out", type=Path, help="the image folder to write")
    parser.add_argument("--exclude", nargs="+", required=True, help="toy concepts the images must not depict")
    parser.add_argument("--images", type=int, default=32, help="images to keep (default: 32, the benchmark's)")
    parser.add_argument("--draws", type=int, default=128, help="images to draw at most (default: 128)")
    parser.add_argument("--model", default="toy", help="the base model (default: the shipped toy model)")
    args = parser.parse_args()
    try:
        for concept in args.exclude:
            toy_concept_spec(concept)
        if not 0 < args.images <= args.draws:
            raise ConfigError(f"--images must be between 1 and --draws ({args.draws}), got {args.images}")
        if (args.out / "metadata.csv").exists():
            raise ConfigError(f"{args.out} already holds an image folder")
        images, depicted = target_free_images(args.model, args.class_prompt, args.exclude, args.images, args.draws)
    except MimaError as e:
        parser.error(str(e))
    write_image_folder(images, [args.class_prompt] * len(images), args.out)
    counts = ", ".join(f"{concept} {n}" for concept, n in depicted.items())
    print(f"{args.out}: {len(images)} images; of the {args.draws} drawn the judge named {counts}")


if __name__ == "__main__":
    main()
