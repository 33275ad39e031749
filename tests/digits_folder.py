"""scikit-learn's 1,797 real 8x8 handwritten digits (`sklearn.datasets.load_digits`, shipped with
the package: no download) written as an image folder: root/train/<digit>/NNNN.png and
root/test/<digit>/NNNN.png, 8-bit grayscale PNGs, with a fixed seeded split.

A helper for the tests (not a test module). The pixel values 0..16 are scaled to 0..255 and
rounded, so a training input is `round(v * 255 / 16) / 255`; `DigitsFolder` keeps the arrays
that were written, to check what a reader makes of the files independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DigitsFolder:
    root: Path
    train_pixels: np.ndarray  # uint8 [N, 8, 8] in the order of the files (class, then name)
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray

    @property
    def train_inputs(self) -> np.ndarray:
        """float32 [N, 1, 8, 8] in [0, 1], as training reads the train files."""
        return (self.train_pixels.astype(np.float32) / 255.0)[:, None]

    @property
    def test_inputs(self) -> np.ndarray:
        return (self.test_pixels.astype(np.float32) / 255.0)[:, None]


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, 8, 8] (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def write_digits_folder(root: Path, test_fraction: float = 0.25, seed: int = 0,
                        limit: int | None = None) -> DigitsFolder:
    """Write the digits into `root` (train/ and test/, one folder per digit 0..9); a seeded
    permutation puts `test_fraction` of them into test/. `limit`: only the first `limit` digits
    of the permutation (a smaller folder for quick tests)."""
    pixels, labels = digits_pixels()
    order = np.random.default_rng(seed).permutation(len(labels))
    if limit is not None:
        order = order[:limit]
    n_test = round(test_fraction * len(order))
    parts = {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part, rows in parts.items():
        for digit in range(10):
            (root / part / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in rows:
            Image.fromarray(pixels[i]).save(root / part / str(labels[i]) / f"{i:04d}.png")
        # the order a reader lists them in: by class folder, then by file name
        ordered = sorted(rows, key=lambda i: (labels[i], f"{i:04d}"))
        written[part] = pixels[ordered], labels[ordered]
    return DigitsFolder(root, *written["train"], *written["test"])


if __name__ == "__main__":  # python tests/digits_folder.py DIR: the folder configs/digits.yaml reads
    import sys

    written = write_digits_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "data/digits"))
    print(f"{written.root}: {len(written.train_labels)} train, {len(written.test_labels)} test PNGs")
