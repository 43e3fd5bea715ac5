from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mima.data.image_folder import METADATA_FILE, read_image_folder, to_rgb, write_image_folder
from mima.errors import DataError


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_write_then_read_round_trip(tmp_path):
    images = _images(3)
    prompts = ["a photo of a star", 'a "quoted", comma prompt', ""]
    write_image_folder(images, prompts, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", METADATA_FILE]
    loaded, loaded_prompts = read_image_folder(tmp_path / "out")
    assert loaded_prompts == prompts
    for original, image in zip(images, loaded, strict=True):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), original)


def test_folder_without_metadata_reads_every_image_in_name_order(tmp_path):
    for name, size in [("b.jpg", 5), ("a.png", 4), ("c.webp", 6)]:
        Image.new("L", (size, size)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    images, prompts = read_image_folder(tmp_path)
    assert [im.size[0] for im in images] == [4, 5, 6]
    assert all(im.mode == "RGB" for im in images)
    assert prompts == [None, None, None]


def test_write_rejects_mismatched_counts_and_bad_arrays(tmp_path):
    with pytest.raises(DataError, match="2 images but 1 prompts"):
        write_image_folder(_images(2), ["x"], tmp_path)
    with pytest.raises(DataError, match=r"image 0 .*expected a uint8 array"):
        write_image_folder([np.zeros((4, 4, 3), dtype=np.float32)], ["x"], tmp_path)


def test_corrupt_png_is_named(tmp_path):
    write_image_folder(_images(2), ["a", "b"], tmp_path)
    (tmp_path / "00001.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"cannot decode image '.*00001\.png'"):
        read_image_folder(tmp_path)


def test_truncated_png_is_named(tmp_path):
    Image.fromarray(_images(1)[0]).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        read_image_folder(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist"):
        read_image_folder(tmp_path / "nowhere")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        read_image_folder(tmp_path / "file.png")


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"'{tmp_path}' holds no images"):
        read_image_folder(tmp_path)


def test_metadata_naming_a_missing_file(tmp_path):
    write_image_folder(_images(2), ["a", "b"], tmp_path)
    (tmp_path / "00000.png").unlink()
    with pytest.raises(DataError, match=r"line 2: image file '00000\.png' not found"):
        read_image_folder(tmp_path)


def test_metadata_with_wrong_header(tmp_path):
    write_image_folder(_images(1), ["a"], tmp_path)
    (tmp_path / METADATA_FILE).write_text("file,caption\n00000.png,a\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) file_name, prompt"):
        read_image_folder(tmp_path)


def _palette_with_transparent_index() -> Image.Image:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 1  # red is transparent: on white
    return image


# mode -> (image, file format it is saved in (None: decoded in memory), RGB of pixel (0, 0), RGB of pixel (1, 1))
MODES = {
    "I;16": (Image.fromarray(np.array([[25700, 0], [0, 65535]], dtype=np.uint16)), "PNG", (100,) * 3, (255,) * 3),
    "I": (Image.fromarray(np.array([[25700, 0], [0, 65535]], dtype=np.int32)), None, (100,) * 3, (255,) * 3),
    "F": (Image.fromarray(np.array([[0.5, 0], [0, 1]], dtype=np.float32)), None, (128,) * 3, (255,) * 3),
    "P": (_palette_with_transparent_index(), "PNG", (0, 0, 255), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "JPEG", (254, 0, 0), (254, 0, 0)),
    "LA": (Image.fromarray(np.array([[[0, 255], [0, 0]]] * 2, dtype=np.uint8), mode="LA"), "PNG", (0,) * 3,
           (255,) * 3),
    "RGBA": (Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]] * 2, dtype=np.uint8)), "PNG", (255, 0, 0),
             (255,) * 3),
    "1": (Image.fromarray(np.array([[True, False], [False, False]])), "PNG", (255,) * 3, (0,) * 3),
    "L": (Image.fromarray(np.array([[7, 0], [0, 200]], dtype=np.uint8)), "BMP", (7,) * 3, (200,) * 3),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_pillow_mode_decodes_as_a_viewer_shows_it(tmp_path, mode):
    image, file_format, first, last = MODES[mode]
    assert image.mode == mode
    if file_format is None:
        decoded = to_rgb(image)
    else:
        image.save(tmp_path / f"image.{file_format.lower()}", file_format)
        [decoded], _ = read_image_folder(tmp_path)
        assert Image.open(tmp_path / f"image.{file_format.lower()}").mode == mode  # the file keeps its mode
    assert decoded.mode == "RGB"
    pixels = np.asarray(decoded)
    np.testing.assert_allclose(pixels[0, 0], first, atol=2)
    np.testing.assert_allclose(pixels[1, 1], last, atol=2)
