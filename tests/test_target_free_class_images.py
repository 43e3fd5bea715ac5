"""benchmarks/target_free_class_images.py keeps the base model's class images that depict no target, in draw order."""

import sys

import numpy as np
import pytest
from PIL import Image

from mima.data.image_folder import read_image_folder
from mima.evaluate.encoders import get_encoder
from mima.models.components import Components
from mima.sampling import sample_images


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("target_free_class_images")


def test_the_kept_images_are_the_benchmarks_own_less_those_of_the_targets(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "objects"
    argv = ["a photo of an object", str(out), "--exclude", "square", "star", "--images", "4", "--draws", "16"]
    monkeypatch.setattr(sys, "argv", ["target_free_class_images.py", *argv])
    script.main()
    images, captions = read_image_folder(out)
    assert len(images) == 4 and set(captions) == {"a photo of an object"}
    judge = get_encoder("toy-judge")
    labels = judge.predict_labels(images)
    assert judge.success_rate(labels, "square") == 0 and judge.success_rate(labels, "star") == 0
    drawn = sample_images(Components.from_pretrained("toy"), ["a photo of an object"] * 16)  # as the benchmark draws
    drawn_labels = judge.predict_labels([Image.fromarray(image) for image in drawn])
    free = [image for image, label in zip(drawn, drawn_labels, strict=True)
            if judge.success_rate(label[None], "square") == 0 and judge.success_rate(label[None], "star") == 0]
    assert [np.asarray(image).tolist() for image in images] == [image.tolist() for image in free[:4]]
    squares, stars = (round(16 * judge.success_rate(drawn_labels, c)) for c in ("square", "star"))
    assert squares > 0 and f"square {squares}, star {stars}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--exclude", "squares"], "did you mean 'square'?"),
    (["--exclude", "square"], "already holds an image folder"),
    (["--exclude", "square", "--images", "64", "--draws", "32"], "--images must be between 1 and --draws (32)"),
])
def test_bad_input_is_one_line_before_any_drawing_and_keeps_what_exists(script, tmp_path, monkeypatch, capsys, argv,
                                                                         message):
    out = tmp_path / "objects"
    out.mkdir()
    (out / "metadata.csv").write_text("file_name,text\n")
    monkeypatch.setattr(sys, "argv", ["target_free_class_images.py", "a photo of an object", str(out), *argv])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and message in err
    assert (out / "metadata.csv").read_text() == "file_name,text\n"
