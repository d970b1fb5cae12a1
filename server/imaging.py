"""Encoded image bytes -> the model's input tensor, or an error that says what is wrong.

Only allow-listed formats are opened (JPEG, PNG, WebP): Pillow is told which decoders it may try,
so a request cannot reach the dozens of other, rarely hardened, format plugins. Dimensions are
checked *before* pixels are decoded, so a small file declaring a huge canvas (a decompression bomb)
is refused in microseconds with flat memory. Decoding is forced inside the error handling
(``Image.load``), because Pillow decodes lazily and a truncated file would otherwise fail later.

Conversion: the first frame of animated images; palette, 16-bit and CMYK images converted
properly; transparency composited over black (the background of Fashion-MNIST-like data; change
``BACKGROUND`` for other data); then resized to the model's input size.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
BACKGROUND = 0  # value transparent pixels become


class ImageError(ValueError):
    """A body that is not an acceptable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB" without the pitfalls of a bare ``convert``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale to 8 bit (a plain convert("L") clips at 255)
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)


def decode_image(data: bytes, channels: int, size: tuple[int, int], max_pixels: int) -> Tensor:
    """Decode ``data`` into a uint8 tensor ``[channels, height, width]`` of the model's size.

    Raises:
        ImageError: 400 for empty or corrupt data, 415 for other formats, 413 for images with
            more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageError("empty body: send one encoded image (JPEG, PNG or WebP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", 413)
            opened.seek(0)  # first frame of animated WebP
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = _to_mode(image, "L" if channels == 1 else "RGB")
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    except ImageError:
        raise
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind in ALLOWED_FORMATS:
            raise ImageError(f"corrupt or truncated {kind} image: its header does not parse") from None
        if kind:
            raise ImageError(f"unsupported image format {kind}; send JPEG, PNG or WebP", 415) from None
        raise ImageError("body is not a recognizable image; send JPEG, PNG or WebP") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image too large: {error}", 413) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageError(f"corrupt or truncated image: {error}") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def warm_up(channels: int, size: tuple[int, int]) -> None:
    """Decode one small image of every allowed format, so Pillow's plugins and codecs are loaded
    before the first request instead of during it (tens of milliseconds, once)."""
    Image.init()
    for kind in ALLOWED_FORMATS:
        if kind not in Image.SAVE:  # a Pillow built without that encoder can still decode
            continue
        buffer = io.BytesIO()
        Image.new("L", (8, 8)).save(buffer, kind)
        decode_image(buffer.getvalue(), channels, size, max_pixels=size[0] * size[1] + 64)


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
    b"8BPS": "PSD",
}


def _sniff(data: bytes) -> str | None:
    for signature, name in _SIGNATURES.items():
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "AVIF/HEIF"
    return None
