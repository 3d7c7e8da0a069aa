"""Images for predict: any size and mode brought to the dataset's look, and files that do not
decode as one line."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from job.datasets import preset
from job.errors import JobError
from job.images import prepare_image
from tests.trained_runs import write_pngs


def test_images_of_any_size_and_mode_become_the_datasets_format(cifar10, mnist, tmp_path):
    cifar, mnist_p = preset("cifar10"), preset("mnist")
    rgb = cifar10.test_images[7].numpy()

    def encoded(image: Image.Image, fmt="PNG", **options) -> bytes:
        path = tmp_path / f"x.{fmt.lower()}"
        image.save(path, fmt, **options)
        return path.read_bytes()

    exact = [
        Image.fromarray(rgb),
        Image.fromarray(rgb).resize((128, 128), Image.Resampling.NEAREST).convert("RGBA"),  # 4×, alpha
        Image.fromarray(np.pad(rgb, ((0, 0), (16, 16), (0, 0)))),  # wider: the centred square
    ]
    for image in exact:
        assert np.array_equal(prepare_image(encoded(image), cifar, "x"), rgb)
    # a photo-sized JPEG lands close (lossy), and grayscale becomes three equal channels
    big = prepare_image(encoded(exact[1].convert("RGB").resize((640, 640)), "JPEG", quality=95), cifar, "x")
    assert big.shape == (32, 32, 3) and np.abs(big.astype(int) - rgb).mean() < 8
    gray = prepare_image(encoded(Image.fromarray(rgb).convert("L")), cifar, "x")
    assert gray.shape == (32, 32, 3) and (gray[..., 0] == gray[..., 2]).all()
    # MNIST: RGB and 16-bit PNGs of a digit become its 28×28 grayscale pixels
    digit = mnist.test_images[0, :, :, 0].numpy()
    as_16_bit = Image.fromarray(digit.astype(np.uint16) * 257)
    assert as_16_bit.mode.startswith("I")
    for image in (Image.fromarray(digit).convert("RGB"), as_16_bit):
        assert np.array_equal(prepare_image(encoded(image), mnist_p, "x"), digit[..., None])
    # transparency goes onto black, MNIST's background
    clear = Image.new("LA", (56, 56), (255, 0))
    assert not prepare_image(encoded(clear), mnist_p, "x").any()


def test_an_image_that_does_not_decode_is_one_line(mnist, tmp_path):
    (good,) = write_pngs(mnist.test_images[:1], tmp_path)
    with pytest.raises(JobError, match=r"^cut\.png does not decode as an image \("):
        prepare_image(good.read_bytes()[:60], preset("mnist"), "cut.png")
    with pytest.raises(JobError, match=r"^text\.png is not a PNG or JPEG image$"):
        prepare_image(b"hello", preset("mnist"), "text.png")


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk, no pixels: all Pillow reads before it decodes."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
            + struct.pack(">I", zlib.crc32(ihdr)) + b"\0\0\0\0IEND\xaeB`\x82")


@pytest.mark.parametrize("side", [12000, 20000])  # past Pillow's warning; past its refusal
def test_an_image_past_the_decompression_bomb_limit_is_one_line(side, recwarn):
    with pytest.raises(JobError, match=rf"^big\.png is too large to decode: {side * side:,} "
                                       r"pixels, over the 89,478,485 that predict takes; "
                                       r"shrink it first$"):
        prepare_image(png_header(side, side), preset("mnist"), "big.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
