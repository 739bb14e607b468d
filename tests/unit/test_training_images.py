"""train.images: the one implementation of captioned-image listing and preprocessing that the TCD Distill LoRA node
and the accelerate CLI share (recursion, EXIF orientation, resize and crop, caption errors)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import accelerate_tcd as cli
from train import images


def _image(path: Path, size, colour=(200, 30, 30), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation          # EXIF Orientation
        im.save(path, exif=exif)


def test_listing_is_recursive_sorted_and_reads_captions(tmp_path):
    _image(tmp_path / "b.png", (8, 8))
    (tmp_path / "b.txt").write_text(" a red square \n")
    _image(tmp_path / "sub" / "a.png", (8, 8))
    (tmp_path / "sub" / "a.txt").write_text("")
    pairs = images.list_captioned_images(tmp_path)
    assert pairs == [(tmp_path / "b.png", "a red square"), (tmp_path / "sub" / "a.png", "")]
    assert cli.find_captioned_images(tmp_path) == pairs                    # the CLI lists the same


def test_listing_errors_say_what_and_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="no images in .* or its subfolders"):
        images.list_captioned_images(tmp_path)
    _image(tmp_path / "deep" / "x.png", (8, 8))
    with pytest.raises(ValueError, match=r"1 of 1 image\(s\) .* no caption file: \['deep/x.png'\].*deep/x.txt"):
        images.list_captioned_images(tmp_path)
    (tmp_path / "deep" / "x.txt").write_bytes(b"caf\xe9")                   # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"caption 'deep/x.txt' .* is not UTF-8 text \(byte 3\); save it as UTF-8"):
        images.list_captioned_images(tmp_path)
    with pytest.raises(cli.ConfigError, match="--train_data_dir: caption 'deep/x.txt'"):
        cli.find_captioned_images(tmp_path)


def test_exif_orientation_is_applied_before_resize_and_crop(tmp_path):
    """A 'rotate 90' tag (orientation 6) on a 40x20 landscape gives a 20x40 portrait: its shorter side (20) is
    resized to 16 and the centre cropped, so the result is square whatever the tag."""
    _image(tmp_path / "p.jpg", (40, 20), exif_orientation=6)
    assert images.open_rgb(tmp_path / "p.jpg").size == (20, 40)
    out = images.load_square(tmp_path / "p.jpg", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_centre_crop_and_cli_pixels_match_the_node_preprocessing(tmp_path):
    """The CLI's [-1, 1] CHW pixels (centre crop) are the node's [0, 1] HWC image mapped by 2x - 1."""
    im = Image.fromarray((np.arange(30 * 50 * 3) % 251).astype(np.uint8).reshape(30, 50, 3))
    im.save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("gradient")
    node = images.load_square(tmp_path / "g.png", 16)
    item = cli.CaptionedImages(images.list_captioned_images(tmp_path), 16, seed=0)[0]
    assert item["caption"] == "gradient" and item["original_size"] == (30, 50)
    np.testing.assert_allclose(item["pixels"].permute(1, 2, 0).numpy(), node * 2.0 - 1.0, atol=1e-6)
    assert images.centre_crop_origin(27, 16, 16) == (0, 5)


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read training image 'b.png' .*Replace or remove that file"):
        images.open_rgb(tmp_path / "b.png")
