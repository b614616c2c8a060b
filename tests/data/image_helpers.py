"""Writing small real images for tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random image (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)
