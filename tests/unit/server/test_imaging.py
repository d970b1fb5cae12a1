"""Decoding every kind of body a client can send: valid images answer, the rest get a clear 4xx."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from slimserve.server.imaging import ImageError, decode_image
from tests.helpers import bomb_png

SIZE = (28, 28)
LIMIT = 16 * 2**20


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(mode: str = "L", size: tuple[int, int] = (28, 28)) -> Image.Image:
    array = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    gray = Image.fromarray(array)
    return gray if mode == "L" else gray.convert(mode)


@pytest.mark.parametrize(
    ("data", "channels"),
    [
        (encode(gradient(), "PNG"), 1),
        (encode(gradient("RGB"), "JPEG", quality=95), 1),
        (encode(gradient("RGB"), "WEBP", lossless=True), 3),
        (encode(gradient("CMYK"), "JPEG"), 1),
        (encode(gradient("RGBA"), "PNG"), 3),
        (encode(gradient("P"), "PNG"), 1),
        (encode(gradient("L", (300, 200)), "PNG"), 1),
    ],
)
def test_valid_images_become_model_sized_uint8_tensors(data: bytes, channels: int) -> None:
    tensor = decode_image(data, channels, SIZE, LIMIT)
    assert tensor.shape == (channels, 28, 28) and tensor.dtype == torch.uint8
    assert tensor[0, :, -1].float().mean() > tensor[0, :, 0].float().mean() + 100  # the gradient survived


def test_sixteen_bit_png_is_rescaled_not_clipped() -> None:
    array = np.full((28, 28), 32768, dtype=np.uint16)
    tensor = decode_image(encode(Image.fromarray(array), "PNG"), 1, SIZE, LIMIT)
    assert 120 <= int(tensor.float().mean()) <= 135  # half of full scale, not 255


def test_transparency_becomes_the_dataset_background() -> None:
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    assert int(decode_image(encode(image, "PNG"), 1, SIZE, LIMIT).max()) == 0


def test_one_pixel_image_is_answered() -> None:
    assert decode_image(encode(Image.new("L", (1, 1), 200), "PNG"), 1, SIZE, LIMIT).float().mean() == 200


def test_animated_webp_uses_the_first_frame() -> None:
    frames = [Image.new("L", (28, 28), 30), Image.new("L", (28, 28), 220)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert abs(int(decode_image(buffer.getvalue(), 1, SIZE, LIMIT).float().mean()) - 30) <= 2


def png_with_bad_crc() -> bytes:
    data = bytearray(encode(gradient(), "PNG"))
    data[29:33] = b"\x00\x00\x00\x00"  # IHDR's CRC
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty body"),
        (b"hello, this is text", 400, "not a recognizable image"),
        (encode(gradient("RGB"), "JPEG")[:300], 400, "corrupt or truncated"),
        (png_with_bad_crc(), 400, "corrupt or truncated PNG"),
        (encode(gradient("P"), "GIF"), 415, "GIF"),
        (encode(gradient(), "BMP"), 415, "BMP"),
        (encode(gradient(), "TIFF"), 415, "TIFF"),
    ],
)
def test_bad_bodies_get_a_clear_client_error(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageError, match=message) as error:
        decode_image(data, 1, SIZE, LIMIT)
    assert error.value.status == status


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (100_000, 100_000)])
def test_decompression_bombs_are_refused_before_decoding(width: int, height: int) -> None:
    data = bomb_png(width, height)
    assert len(data) < 200
    started = time.perf_counter()
    with pytest.raises(ImageError) as error:
        decode_image(data, 1, SIZE, LIMIT)
    assert error.value.status == 413
    assert time.perf_counter() - started < 0.5
