"""Image files to model inputs: the one definition that training (image-folder data sets) and
the service (PNG/JPEG uploads of an artifact that records it) both use, so an uploaded picture
becomes exactly the array a training picture became.

An image is converted to 8-bit grayscale ("L", 1 channel) or RGB (3 channels) with Pillow's
`convert`, resized to [H, W] with Pillow's bilinear filter when a size is set, and scaled to
[0, 1] as float32 [C, H, W] (uint8 / 255). Torch-free: Pillow (imported when first used) and numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode images are converted to
# Pillow modes read as one channel when a folder does not say how many it wants
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def channels_of(mode: str) -> int:
    """How many channels an image of Pillow `mode` is read with when none is set: 1 for
    grayscale modes, else 3."""
    return 1 if mode in GRAY_MODES else 3


def to_channels(image: Any, channels: int) -> Any:
    """`image` in the mode of `channels` (a palette image through its colours first)."""
    wanted = MODES[channels]
    if image.mode == "P":  # palette: its colours are what the picture shows
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image if image.mode == wanted else image.convert(wanted)


def image_array(image: Any, channels: int, resize: tuple[int, int] | list[int] | None = None) -> np.ndarray:
    """A decoded Pillow image as float32 [channels, H, W] in [0, 1]: converted to `channels`,
    resized to `resize` = (H, W) with the bilinear filter when given and not already that size."""
    from PIL import Image

    image = to_channels(image, channels)
    if resize is not None and image.size != (resize[1], resize[0]):
        image = image.resize((int(resize[1]), int(resize[0])), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W] or [H, W, 3]
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def image_extensions() -> set[str]:
    """File name endings Pillow can open (".png", ".jpg", ...), lower case."""
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}
