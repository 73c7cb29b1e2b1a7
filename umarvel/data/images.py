"""Reading images: the one place a file or a PIL image becomes the RGB image a model sees.

Training, evaluation, mining, `umarvel data validate`, video frames and `Embedder.encode` all
read images here, so every path obeys the same three rules:

- Any PIL mode becomes a correct RGB image (`to_rgb`). PIL's own `convert("RGB")` clips 16-bit
  samples at 255 (a 16-bit PNG turns all white) and drops transparency (transparent pixels show
  whatever colour they hide); here 16-bit samples are scaled to 8 bits and transparency is
  composited on white, the convention of image viewers and of qwen-vl-utils for RGBA.
- A file over `data.max_image_pixels` pixels is refused from its header, before it is decoded
  (a 20000x20000 PNG decodes into 1.2 GB per copy). The limit is process-wide, as PIL's own is:
  each command sets it from its config (`set_max_pixels`), and DataLoader workers, forked from
  the process, inherit it.
- An image whose sides differ by more than `MAX_ASPECT_RATIO` is refused, naming the file: the
  official Qwen2-VL tooling (qwen-vl-utils' `fetch_image` and the transformers image
  processor) raises for it rather than padding or cropping, so no reference embedding of such
  an image exists to match. Images smaller than the patch grid are enlarged by that tooling,
  as the released models saw them.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from umarvel.errors import DataError

# PIL refuses files above twice its Image.MAX_IMAGE_PIXELS (89.5M); the default keeps that line.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_PIXELS_KEY = "data.max_image_pixels"
# Largest side ratio qwen-vl-utils and the Qwen2-VL image processor accept (their MAX_RATIO).
MAX_ASPECT_RATIO = 200
# Integer modes whose samples are 16-bit (PIL reads 16-bit PNG and TIFF greyscale as these).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
PREMULTIPLIED_MODES = ("RGBa", "La")
# How a file PIL cannot decode is reported (data validate words it its own way).
UNREADABLE = "cannot read image"

_max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int) -> None:
    """Refuse image files of more than `limit` pixels from now on, in this process and the
    workers it starts (`data.max_image_pixels`)."""
    global _max_pixels
    _max_pixels = int(limit)


def max_pixels() -> int:
    return _max_pixels


@contextmanager
def _opened(path: Path):
    """The lazily opened file, after our pixel limit (PIL's own, which would refuse first with
    a traceback and its own number, is lifted while it opens)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{UNREADABLE}: {err}", file=str(path)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with image:
        pixels = image.width * image.height
        if pixels > _max_pixels:
            raise DataError(f"image of {image.width}x{image.height} = {pixels} pixels is over the limit of "
                            f"{_max_pixels} pixels ({MAX_PIXELS_KEY}; raise it to read this file)", file=str(path))
        yield image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header alone, within the pixel limit."""
    with _opened(Path(path)) as image:
        return image.size


def open_image(path: str | os.PathLike, convert=None) -> Image.Image:
    """The image file at `path`, fully decoded, as RGB (`convert`, default `to_rgb`); a DataError
    names the file when it cannot be read or is over the pixel limit."""
    path = Path(path)
    with _opened(path) as image:
        try:
            image.load()
        except (OSError, ValueError) as err:
            raise DataError(f"{UNREADABLE}: {err}", file=str(path)) from None
        return (convert or to_rgb)(image, file=str(path))


def to_rgb(image: Image.Image, file: str | None = None) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode: 16-bit samples scaled (not clipped) to 8 bits,
    float samples read as 0..1, transparency composited on white; errors name `file`."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = _grey(np.asarray(image).astype(np.int64), 65535, "16-bit integer", file)
    elif image.mode == "F":
        image = _grey(np.asarray(image, dtype=np.float64), 1.0, "floating-point", file)
    if image.mode in PREMULTIPLIED_MODES:
        return _premultiplied_on_white(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise DataError(f"image mode {image.mode} cannot be converted to RGB: {err}", file=file) from None


def pil_rgb(image: Image.Image, file: str | None = None) -> Image.Image:
    """PIL's own `convert("RGB")`, as the official U-MARVEL inference reads images
    (model.rules.images=release): transparency dropped (transparent pixels show the colour they
    hide), 16-bit samples clipped at 255. The converted image keeps no `transparency` note (PIL
    turns a palette's into an RGB colour): the transformers 5 processor would composite that
    colour on white, which the official one (4.45) never did."""
    if image.mode != "RGB":
        try:
            with warnings.catch_warnings():  # PIL's note on palette transparency: dropping it is the point
                warnings.simplefilter("ignore", UserWarning)
                image = image.convert("RGB")
        except ValueError as err:
            raise DataError(f"image mode {image.mode} cannot be converted to RGB: {err}", file=file) from None
    if "transparency" in image.info:
        image = image.copy()
        del image.info["transparency"]
    return image


def _grey(samples: np.ndarray, full_scale: float, kind: str, file: str | None) -> Image.Image:
    """Samples in [0, full_scale] as an 8-bit greyscale image; samples outside are a DataError
    (clipping them would make a silently different picture)."""
    low, high = (samples.min(), samples.max()) if samples.size else (0, 0)
    if low < 0 or high > full_scale or not np.isfinite(samples).all():
        raise DataError(f"{kind} image has samples in [{low:g}, {high:g}], outside the [0, {full_scale:g}] it is read "
                        "in; convert it to an 8-bit image", file=file)
    return Image.fromarray(np.rint(samples * (255 / full_scale)).astype(np.uint8), mode="L")


def _premultiplied_on_white(image: Image.Image) -> Image.Image:
    """A premultiplied-alpha image (RGBa, La) composited on white: colour + white x (1 - alpha)."""
    bands = np.asarray(image).astype(np.int64)
    colour, alpha = bands[..., :-1], bands[..., -1:]
    out = np.clip(colour + 255 - alpha, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out, mode="RGB")


def check_aspect(size: tuple[int, int], file: str | None, resized: bool = False) -> None:
    """Refuse an image (width, height) whose sides differ by more than MAX_ASPECT_RATIO (`resized`:
    the size after rounding into visual tokens, which can pass the ratio when the original did not)."""
    width, height = size
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        after = " after resizing into whole visual tokens" if resized else ""
        raise DataError(f"image of {width}x{height} pixels{after} has an aspect ratio of {ratio:.0f}, over the "
                        f"{MAX_ASPECT_RATIO} that Qwen2-VL's image processor accepts; crop or pad it", file=file)
