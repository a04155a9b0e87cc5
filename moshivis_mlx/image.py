"""Photos -> SigLIP pixels -> image tokens.

`load_image` is the one place where user files are opened: it turns whatever Pillow can
read (any colour mode, EXIF-rotated, animated, 16-bit; HEIC/HEIF photos through
pillow-heif) into a plain RGB image, and turns every way a file can be unusable into an
`ImageError` whose one-line message names the file (and the format, when it is one that
cannot be read), so an app can print it and exit.

Memory is bounded by what comes out, not by what the file claims: the pixel count is
checked from the header before decoding, a JPEG is decoded at the reduced scale the
output needs, and any image larger than `MAX_SIDE` is box-reduced in strips before its
colours are converted, so a 100-megapixel 16-bit PNG costs its raw raster once.
`preprocess` resizes and normalises as MoshiVis does, and `ImageEncoder` runs the SigLIP
tower on the result.
"""

from __future__ import annotations

import io
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

MAX_SIDE = 2048
"""Images are reduced (by an integer factor) to at most twice this on their longer side:
far more than the encoder's 448 pixels or a thumbnail need."""
STRIP_BYTES = 8 << 20
"""Rows converted and reduced at once when reducing a large image."""
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that makes the picture upright."""
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")

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


_plugins_registered = False


def _register_plugins() -> None:
    """HEIC / HEIF (iPhone photos) through pillow-heif, when installed."""
    global _plugins_registered
    if not _plugins_registered:
        _plugins_registered = True
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return
        register_heif_opener()


FTYP_BRANDS = {b"heic": "a HEIC photo", b"heix": "a HEIC photo", b"hevc": "a HEIC photo",
               b"heim": "a HEIC photo", b"heis": "a HEIC photo", b"mif1": "a HEIF image",
               b"msf1": "a HEIF image", b"avif": "an AVIF image", b"avis": "an AVIF image",
               b"isom": "an MP4 video", b"mp41": "an MP4 video", b"mp42": "an MP4 video",
               b"qt  ": "a QuickTime video", b"M4A ": "an M4A audio file",
               b"crx ": "a Canon RAW photo (CR3)"}
MAGIC = [(b"%PDF", "a PDF document"), (b"\xff\x0a", "a JPEG XL image"),
         (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"), (b"PK\x03\x04", "a ZIP archive"),
         (b"\x1f\x8b", "a gzip archive"), (b"ID3", "an MP3 file"), (b"OggS", "an Ogg file"),
         (b"fLaC", "a FLAC file"), (b"\x1a\x45\xdf\xa3", "a WebM/Matroska video"),
         (b"II*\x00", "a TIFF variant (a camera RAW photo?)"),
         (b"MM\x00*", "a TIFF variant (a camera RAW photo?)")]


def file_kind(head: bytes) -> str | None:
    """What a file that is no image Pillow reads is, from its first bytes (None: unknown)."""
    if head[4:8] == b"ftyp":
        return FTYP_BRANDS.get(head[8:12], "an ISO media file (video or HEIF)")
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "a WAV audio file"
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "an SVG drawing"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    return None


def _unreadable(path: Path, opened: Path | io.BytesIO) -> ImageError:
    """Pillow does not know the file: say what it is, when that can be told."""
    if isinstance(opened, io.BytesIO):
        head = opened.getvalue()[:64]
    else:
        with open(path, "rb") as f:
            head = f.read(64)
    kind = file_kind(head)
    if kind in ("a HEIC photo", "a HEIF image"):
        return ImageError(f"{path}: {kind}, and HEIC support (pillow-heif) is not installed",
                          "pip install pillow-heif, or convert it to JPEG")
    if kind is not None:
        return ImageError(f"{path}: {kind}, not an image format this app reads (JPEG, PNG, "
                          f"HEIC, WebP, GIF, TIFF, BMP, ...)", "convert it to JPEG or PNG")
    return ImageError(f"{path}: not an image (or a format Pillow cannot read)")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block does not make the pixels unusable
        return 1


def _reduce(img: Image.Image) -> Image.Image:
    """`img` box-reduced by the integer factor that brings its longer side under
    2 * MAX_SIDE, strip by strip (modes `reduce` cannot take are converted per strip, so
    no full-size copy is made); 16-bit grey stays 16-bit (as mode I)."""
    w, h = img.size
    # Never below one pixel across: a 10000 x 1 strip is kept as it is (it is small).
    factor = min(max(w, h) // MAX_SIDE, min(w, h))
    if factor <= 1:
        return img
    mode = img.mode
    if mode in SIXTEEN_BIT:
        work = "I"
    elif mode in ("1", "P", "PA"):
        work = "RGBA" if mode == "PA" or "transparency" in img.info else "RGB"
    else:
        work = None
    out_w, out_h = w // factor, h // factor
    rows = factor * max(1, STRIP_BYTES // (4 * w * factor))
    strips = []
    for y in range(0, out_h * factor, rows):
        piece = img.crop((0, y, out_w * factor, min(y + rows, out_h * factor)))
        strips.append(((piece.convert(work) if work else piece).reduce(factor), y // factor))
    out = Image.new(strips[0][0].mode, (out_w, out_h))
    for piece, y in strips:
        out.paste(piece, (0, y))
    out.info["sixteen_bit"] = mode in SIXTEEN_BIT
    return out


def load_image(source: ImageInput | bytes, name: str = "<image>") -> Image.Image:
    """A file path, a file's bytes (named `name` in messages: a picture sent over the
    network) or an already opened PIL image -> a decoded RGB image, upright.

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

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(f"{name}: empty image (0 bytes)")
        path, opened = Path(name), io.BytesIO(data)
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, expected an image file")
        if not path.is_file():
            raise ImageError(f"{name}: not a regular file (a pipe or a device), expected an "
                             f"image")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        opened = path
    _register_plugins()
    try:
        with _strict_decoding():
            with Image.open(opened) as img:
                _check_size(img, name)  # from the header, before any pixel is decoded
                orientation = _orientation(img)
                if img.format == "JPEG":
                    img.draft(img.mode, (MAX_SIDE, MAX_SIDE))  # decoded at 1/2, 1/4, 1/8
                img.load()  # the first frame of animated images
                small = _reduce(img)
                if small is not img:
                    small = small.transpose(ORIENTATIONS[orientation]) \
                        if orientation in ORIENTATIONS else small
                    rgb = to_rgb(small, name, upright=True)
                else:
                    rgb = to_rgb(img, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise _unreadable(path, opened) from None
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


def to_rgb(img: Image.Image, name: str = "<image>", upright: bool = False) -> Image.Image:
    """Any Pillow mode -> RGB: EXIF orientation applied (unless `upright`), transparency
    over white, 16-bit and float grey scaled to 8 bits."""
    if not upright:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass  # a malformed EXIF block does not make the pixels unusable
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" and img.info.get("sixteen_bit"):
        mode = "I;16"  # a reduced 16-bit image: its range is 16-bit's
    if mode in ("I", "F") + SIXTEEN_BIT:
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
