"""ROS image messages to RGB arrays, and the one resize every stored frame goes through.

All functions return ``uint8`` arrays of shape (H, W, 3) in RGB order. Decoding never resizes;
``fit_square`` is the single place where frames change size (center-crop to a square, then
``cv2.INTER_AREA``), so a frame is resampled at most once between the camera and the dataset.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from lapa_training.data.errors import IngestError

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)

# encoding -> (channels, bytes per channel, conversion to RGB applied to the (H, W, C) array)
_RAW_ENCODINGS: dict[str, tuple[int, int, int | None]] = {
    "rgb8": (3, 1, None),
    "bgr8": (3, 1, cv2.COLOR_BGR2RGB),
    "8UC3": (3, 1, cv2.COLOR_BGR2RGB),  # like cv_bridge: unlabelled 3-channel 8-bit is BGR
    "rgba8": (4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, 1, cv2.COLOR_BGRA2RGB),
    "8UC4": (4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": (1, 1, cv2.COLOR_GRAY2RGB),
    "8UC1": (1, 1, cv2.COLOR_GRAY2RGB),
    "mono16": (1, 2, cv2.COLOR_GRAY2RGB),
    "16UC1": (1, 2, cv2.COLOR_GRAY2RGB),
    "rgb16": (3, 2, None),
    "bgr16": (3, 2, cv2.COLOR_BGR2RGB),
    "yuv422": (2, 1, cv2.COLOR_YUV2RGB_UYVY),  # ROS 'yuv422' is UYVY byte order
    "uyvy": (2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": (2, 1, cv2.COLOR_YUV2RGB_YUY2),
}
RAW_ENCODINGS = tuple(_RAW_ENCODINGS)


def raw_image_to_rgb(height: int, width: int, encoding: str, is_bigendian: int, step: int,
                     data: np.ndarray | bytes | memoryview) -> np.ndarray:
    """Pixels of a ``sensor_msgs/Image`` as RGB uint8 (height, width, 3).

    Honours ``step`` (row stride in bytes, rows may be padded) and ``is_bigendian`` for 16-bit
    encodings. 16-bit values are scaled to 8 bits by keeping the high byte (v >> 8). For rgb8 with
    unpadded rows the result is a read-only view of ``data``: nothing is copied.
    Raises IngestError for an unknown encoding or a size that does not add up.
    """
    spec = _RAW_ENCODINGS.get(encoding)
    if spec is None:
        raise IngestError(f"unknown image encoding '{encoding}' (supported: {', '.join(RAW_ENCODINGS)}, "
                          "and sensor_msgs/CompressedImage jpeg/png)")
    channels, depth, conversion = spec
    row_bytes = width * channels * depth
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    if conversion is None and depth == 1 and step == row_bytes and buf.size >= row_bytes * height > 0:
        return buf[:row_bytes * height].reshape(height, width, channels)  # fast path: a view, no copy
    if height <= 0 or width <= 0:
        raise IngestError(f"empty image ({width}x{height})")
    if step < row_bytes:
        raise IngestError(f"image step {step} is smaller than width*bytes per pixel = {row_bytes} ({encoding})")
    needed = step * (height - 1) + row_bytes
    if buf.size < needed:
        raise IngestError(f"image data has {buf.size} bytes, {width}x{height} {encoding} with step {step} "
                          f"needs {needed}")
    if buf.size < step * height:  # the last row is not padded: pad it (rare, so a copy is fine)
        buf = np.concatenate([buf, np.zeros(step * height - buf.size, np.uint8)])
    rows = buf[: step * height].reshape(height, step)
    pixels = rows[:, :row_bytes]
    if depth == 2:
        dtype = ">u2" if is_bigendian else "<u2"
        pixels = (np.ascontiguousarray(pixels).view(dtype) >> 8).astype(np.uint8)
    img = pixels.reshape(height, width, channels)
    if conversion is None:
        return img
    if channels == 1:
        img = img[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(img), conversion)


def image_msg_to_rgb(msg) -> np.ndarray:
    """A deserialized ``sensor_msgs/Image`` as RGB uint8 (H, W, 3); see raw_image_to_rgb."""
    return raw_image_to_rgb(int(msg.height), int(msg.width), msg.encoding, int(msg.is_bigendian),
                            int(msg.step), msg.data)


def compressed_msg_to_rgb(msg) -> np.ndarray:
    """A deserialized ``sensor_msgs/CompressedImage`` (jpeg, png, anything cv2.imdecode reads) as RGB uint8."""
    fmt = (msg.format or "").lower()
    if "compresseddepth" in fmt:
        raise IngestError(f"compressed depth images are not supported (format '{msg.format}')")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise IngestError(f"cannot decode compressed image (format '{msg.format}', {data.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class JpegInfo(NamedTuple):
    height: int
    width: int
    components: int  # 3: colour (YCbCr), 1: grey, 4: CMYK/YCCK
    exif: bool  # an Exif block, which may rotate the decoded image


# start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_info(data) -> JpegInfo | None:
    """Size and colour components of a complete JPEG, read from its frame header without decoding;
    None when the bytes are not one whole JPEG (no start/end marker, cut short, no frame header)."""
    data = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    end = len(data)
    while end > 2 and data[end - 1] == 0:  # some drivers pad the buffer after the end marker
        end -= 1
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return None
    pos, exif = 2, False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 10 > end or length < 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return JpegInfo(height, width, data[pos + 9], exif) if height and width else None
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        exif = exif or (marker == 0xE1 and bytes(data[pos + 4:pos + 8]) == b"Exif")
        pos += 2 + length
    return None


def fit_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square (the shorter side), then resize to (size, size) with cv2.INTER_AREA.

    size=0 keeps the image as it is. An image already size x size is returned unchanged
    (bit-identical, not resampled).
    """
    h, w = rgb.shape[:2]
    if size == 0 or (h == size and w == size):
        return rgb
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = rgb[y0:y0 + side, x0:x0 + side]
    if side == size:
        return crop
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
