"""Image scaling for the ``resize`` model: nearest-neighbour enlargement with Pillow, and the result as PNG.

Both are deterministic: NEAREST copies pixels (no arithmetic), and Pillow's PNG encoder with its default
settings gives the same bytes for the same image and Pillow/zlib build.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_SCALE = 2
MIN_SCALE = 1
MAX_SCALE = 8
# 8192 x 8192: an image larger than this once scaled is refused rather than allocated.
MAX_OUTPUT_PIXELS = 1 << 26


def scale_parameter(raw: object) -> int:
    """The ``scale`` request parameter, an integer 1..8 (a string or a number). Raises ValueError."""
    # Parameters usually arrive as strings; bool is an int subclass but never a scale.
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"parameter 'scale' must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter 'scale' must be an integer, got {raw!r}") from None
    if not MIN_SCALE <= value <= MAX_SCALE:
        raise ValueError(f"parameter 'scale' must be between {MIN_SCALE} and {MAX_SCALE}, got {value}")
    return value


def resize(image: np.ndarray, scale: int) -> np.ndarray:
    """The grey UINT8 image [H, W] enlarged ``scale`` times in each direction (each pixel a scale x scale block).
    Raises ValueError for an empty image or one too large once scaled."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"IMAGE must be a grey UINT8 image [H, W], got {image.dtype} {list(image.shape)}")
    height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"IMAGE is empty ({height}x{width})")
    if height * width * scale * scale > MAX_OUTPUT_PIXELS:
        raise ValueError(f"IMAGE {height}x{width} scaled by {scale} exceeds {MAX_OUTPUT_PIXELS} pixels")
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (width * scale, height * scale), Image.Resampling.NEAREST
    )
    return np.asarray(resized, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """The grey UINT8 image [H, W] as a PNG file (8-bit greyscale)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
