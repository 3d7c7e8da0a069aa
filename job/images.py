"""Images for `cnn-job predict`: a PNG or JPEG of any size and mode, decoded with Pillow and
brought to what the dataset's images look like (H×W×C uint8), for DeviceBatches to normalise
as it does the archives' images."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

from job.datasets import DatasetPreset
from job.errors import JobError, first_line

IMAGE_FORMATS = ("PNG", "JPEG")


def prepare_image(data: bytes, p: DatasetPreset, name: str) -> np.ndarray:
    """An encoded PNG or JPEG as the dataset's images look: H×W×C uint8, grayscale 28×28 for
    MNIST, RGB 32×32 for CIFAR-10.

    Any size and mode: EXIF orientation applied; 16-bit samples scaled to 8; transparency
    composited onto black (MNIST's background); the largest centred square kept (the datasets'
    images are square and centred) and resized to the net's side, area-averaged when shrinking,
    bicubic when enlarging. Colours are not inverted: MNIST digits are light on dark.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    side, mode = p.image_size, "L" if p.channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():  # Pillow's warning for a huge image: our line instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise _too_large(name, image.width * image.height)
        if image.format == "JPEG":  # decode at a reduced scale when the file is much larger
            image.draft(mode, (side, side))
        image = ImageOps.exif_transpose(image)
        image.load()
    except UnidentifiedImageError:
        raise JobError(f"{name} is not a PNG or JPEG image") from None
    except Image.DecompressionBombError as error:  # twice the limit: Pillow refuses it itself
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(name, int(pixels[1]) if pixels else None) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise JobError(f"{name} does not decode as an image ({first_line(error, 80)})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit PNG: scale, not clip
        image = Image.fromarray((np.asarray(image, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert(mode)
    width, height = image.size
    square = min(width, height)
    box = ((width - square) // 2, (height - square) // 2)
    image = image.crop((*box, box[0] + square, box[1] + square))
    if square != side:
        shrinking = square > side
        image = image.resize((side, side), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8).reshape(side, side, p.channels)


def _too_large(name: str, pixels: int | None) -> JobError:
    """A PNG or JPEG past Pillow's decompression-bomb limit: refused before it is decoded (it
    could take gigabytes, for an image predict shrinks to 28 or 32 pixels anyway)."""
    from PIL import Image

    size = f"{pixels:,} pixels" if pixels else "its size"
    return JobError(f"{name} is too large to decode: {size}, over the "
                    f"{Image.MAX_IMAGE_PIXELS:,} that predict takes; shrink it first")
