"""Your own network and your own data through modeconn's Python API.

A small CNN defined here, scikit-learn's 8x8 handwritten digits as torch DataLoaders: two networks
trained by an ordinary loop, a Bezier curve between them, FGE from the first, the ensemble evaluated
against the single network (paired bootstrap interval), and the artifact `modeconn serve` reads.

    pip install scikit-learn        # the digits ship with it (no download)
    python examples/own_model.py --out artifacts/digits
    python examples/own_model.py --tiny      # a few seconds: what the tests run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modeconn


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digit_loaders() -> dict[str, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    splits = {"train": order[:1200], "val": order[1200:1400], "test": order[1400:]}
    return {name: DataLoader(TensorDataset(x[i], y[i]), batch_size=128, shuffle=name == "train")
            for name, i in splits.items()}


def train(seed: int, loader: DataLoader, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few epochs only (seconds)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/digits"), help="artifact folder to write")
    args = parser.parse_args()
    epochs = 2 if args.tiny else 20
    data = digit_loaders()

    first, second = train(0, data["train"], epochs), train(1, data["train"], epochs)

    curve = modeconn.fit_curve(first, second, data["train"], val=data["val"], epochs=epochs, lr=0.02)
    along = curve.evaluate(data["test"], points=5 if args.tiny else 21)
    print(f"curve: worst point {along.headline['curve_max_test_error']:.2f} % test error, straight line "
          f"{along.headline['line_max_test_error']:.2f} %; curve max - worse end "
          f"{along.differences['curve'].text()} pp (95 % interval)")
    middle = curve.network(0.5)  # a plain nn.Module, BN recomputed at t = 0.5

    snapshots = modeconn.fge(first, data["train"], epochs=4 if args.tiny else 12, cycle_epochs=2, lr1=0.05, lr2=0.005)
    ensemble = modeconn.evaluate_ensemble(snapshots, data["test"], val=data["val"])
    single = modeconn.evaluate_ensemble(first, data["test"])
    print(f"FGE: {len(snapshots)} snapshots, ensemble test error {ensemble.error:.2f} % (NLL {ensemble.nll:.3f}, "
          f"T = {ensemble.temperature:.2f}); single network {single.error:.2f} %; difference "
          f"{ensemble.compare(single)['error'].text()} pp (95 % interval)")
    print(f"network at t = 0.5: {modeconn.evaluate_ensemble(middle, data['test']).error:.2f} % test error")

    out = modeconn.export(args.out, members=snapshots, curve=curve, swa=modeconn.swa(snapshots, data["train"]),
                          example_input=next(iter(data["test"]))[0][:16], test=data["test"],
                          class_names=[str(i) for i in range(10)], name="modeconn-digits",
                          # the gate on the curve's interpolated BN statistics: one of these 397 test
                          # digits is 0.25 pp, so allow one to change its answer between grid points
                          max_bn_interpolation_pp=0.5)
    # export(None, ...) puts it into the BentoML model store instead, for `bentoml serve` (README)
    print(f"artifact: {out}")


if __name__ == "__main__":
    main()
