"""Photos -> SigLIP pixels -> image tokens.

`load_image` is the one place where user files are opened: it turns whatever Pillow can
read (any colour mode, EXIF-rotated, animated, 16-bit) into a plain RGB image, and turns
every way a file can be unusable into an `ImageError` whose one-line message names the
file, so an app can print it and exit. `preprocess` resizes and normalises as MoshiVis
does, and `ImageEncoder` runs the SigLIP tower on the result.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, one_line
from .models.siglip import SiglipConfig, SiglipVision

MAX_PIXELS = 100_000_000
"""Larger images are refused before decoding: a photo that big is a mistake or an attack
(a small compressed file can claim gigapixels)."""

MEAN, STD = 0.5, 0.5
"""SigLIP's normalisation: x/255 in [0, 1] -> (x - 0.5) / 0.5 in [-1, 1]."""

ImageInput = str | os.PathLike | Image.Image


def _one_line(e: BaseException) -> str:
    return one_line(e, 200)


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated files raise instead of loading grey-filled; bomb warnings are errors.

    Pillow's truncation switch is process-wide and another library may have turned it on,
    so it is forced off for the duration of the decode.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check decides; Pillow's milder limit would only warn.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({w}x{h} = {w * h / 1e6:.0f} megapixels, "
                         f"the limit is {MAX_PIXELS / 1e6:.0f}); downscale it first")


def load_image(source: ImageInput) -> Image.Image:
    """A file path (or an already opened PIL image) -> a decoded RGB image, upright.

    Raises `ImageError` for a missing path, a directory, an empty, unreadable, truncated
    or too large file. Animated images give their first frame.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<image>"
        img = source
        with _strict_decoding():
            _check_size(img, name)
            try:
                img.load()
            except Exception as e:  # Pillow raises many types for corrupt data
                raise ImageError(f"{name}: cannot decode the image ({_one_line(e)})") from None
        return to_rgb(img, name)

    path = Path(source)
    name = str(path)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with _strict_decoding():
            with Image.open(path) as img:
                _check_size(img, name)  # from the header, before any pixel is decoded
                img.load()  # the first frame of animated images
                rgb = to_rgb(img, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image too large (the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels); downscale it first") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
        raise ImageError(f"{name}: cannot decode the image ({_one_line(e)})") from None
    return rgb


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Any Pillow mode -> RGB: EXIF orientation applied, transparency over white,
    16-bit and float grey scaled to 8 bits."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a malformed EXIF block does not make the pixels unusable
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _grey_to_rgb(np.asarray(img), mode)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: unsupported colour mode {mode} ({_one_line(e)})") from None


def _grey_to_rgb(a: np.ndarray, mode: str) -> Image.Image:
    """High-bit-depth grey -> 8-bit RGB. 16-bit data spans 0..65535; 32-bit integer and float
    images carry no range, so it is taken from the values (8-bit, 16-bit, [0, 1] or min-max)."""
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0
    else:
        lo, hi = float(a.min()), float(a.max())
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            a = a / 257.0
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        else:
            a = np.zeros_like(a)
    grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def preprocess(image: ImageInput, size: int) -> np.ndarray:
    """Image -> float32 [size, size, 3] in [-1, 1]: bicubic resize of the whole image (the
    aspect ratio is not kept, as in MoshiVis), x/255, (x - 0.5) / 0.5."""
    img = load_image(image)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (x - MEAN) / STD


class ImageEncoder:
    """A SigLIP tower with its preprocessing: photos in, image tokens out.

    vision = load_vision(bundle)
    tokens = vision.encode_image("photo.jpg")   # [N, D], e.g. [1024, 1152]
    gen.set_image(tokens)
    """

    def __init__(self, model: SiglipVision):
        self.model = model

    @property
    def config(self) -> SiglipConfig:
        return self.model.cfg

    def preprocess(self, image: ImageInput) -> mx.array:
        """Image -> pixels [S, S, 3] in [-1, 1] at the tower's size."""
        return mx.array(preprocess(image, self.config.image_size))

    def __call__(self, pixels: mx.array) -> mx.array:
        """Normalised pixels [B, S, S, 3] -> tokens [B, N, D]."""
        return self.model(pixels)

    def encode_image(self, image: ImageInput) -> mx.array:
        """A photo (path or PIL image) -> its tokens [N, D], evaluated."""
        tokens = self.model(self.preprocess(image)[None])[0]
        mx.eval(tokens)
        return tokens
