"""The user's own data: image folders (streamed), numpy arrays, any torch Dataset; streamed and
in-memory copies of the same data giving the same batches and the same trained weights; the
image preprocessing shared with the service; one-line errors for bad input.

The image folder is scikit-learn's 1,797 real 8x8 handwritten digits written as PNG files
(tests/digits_folder.py); expected values come from the arrays that were written, not from the
reader under test.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modeconn.contract.images import image_array
from modeconn.contract.manifest import ImageInput, InputSpec
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.config import load_config
from modeconn.training.core.data import (
    DataError,
    StreamedSplit,
    build_dataset,
    dataset_from_torch,
    eval_batches,
    hold_out,
    normalize,
    train_batches,
)
from modeconn.training.core.networks import load_data, predict_probs
from tests.digits_folder import DigitsFolder, write_digits_folder

torch.set_num_threads(1)
WORKERS = 1  # worker processes: the streamed path really goes through them


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFolder:
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFolder:
    """400 of the digits (300 train, 100 test): every stage reads the folder many times."""
    return write_digits_folder(tmp_path_factory.mktemp("few-digits"), limit=400)


def _folder(root: Path, val_size: int = 0, **options: object):  # noqa: ANN202
    return build_dataset("image_folder", root=root, val_size=val_size, num_workers=WORKERS, **options)


# -- image folders ---------------------------------------------------------------------------------
def test_digits_folder_reads_as_the_written_pixels(digits: DigitsFolder) -> None:
    data = _folder(digits.root)
    assert data.streamed and isinstance(data.x_train, StreamedSplit)
    assert data.input_shape == (1, 8, 8) and data.class_names == [str(d) for d in range(10)]
    assert (data.size("train"), data.size("test")) == (len(digits.train_labels), len(digits.test_labels))
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert np.array_equal(data.x_train.materialize().numpy(), digits.train_inputs)
    assert np.array_equal(data.first_inputs("test", 50).numpy(), digits.test_inputs[:50])
    assert data.y_train.tolist() == digits.train_labels.tolist()
    # normalisation: the training split's mean and std (n - 1), computed here in float64
    assert data.mean == pytest.approx([digits.train_inputs.astype(np.float64).mean()], rel=1e-12)
    assert data.std == pytest.approx([digits.train_inputs.astype(np.float64).std(ddof=1)], rel=1e-12)
    record = data.describe()
    assert (record["channels"], record["resize"], record["range"]) == (1, None, [0.0, 1.0])
    assert record["root"] == str(digits.root.resolve())


def test_validation_is_held_out_of_train_by_split_seed(digits: DigitsFolder) -> None:
    data = _folder(digits.root, val_size=200, split_seed=3)
    x, y, x_val, y_val = hold_out(torch.from_numpy(digits.train_inputs), torch.from_numpy(digits.train_labels), 200, 3)
    assert torch.equal(data.x_val.materialize(), x_val) and torch.equal(data.y_val, y_val)
    assert torch.equal(data.x_train.materialize(), x) and torch.equal(data.y_train, y)
    other = _folder(digits.root, val_size=200, split_seed=4)
    assert not torch.equal(other.y_val, data.y_val)
    # the default: 10 % of the training files
    assert _folder(digits.root, val_size=None).size("val") == round(0.1 * len(digits.train_labels))


def test_given_mean_and_std_are_used_and_recorded(digits: DigitsFolder) -> None:
    data = _folder(digits.root, mean=[0.5], std=[0.25])
    assert (data.mean, data.std) == ([0.5], [0.25])
    x, _ = next(eval_batches(data, "test", 10))
    assert torch.allclose(x, (torch.from_numpy(digits.test_inputs[:10]) - 0.5) / 0.25)


def test_streamed_and_in_memory_give_the_same_batches(digits: DigitsFolder) -> None:
    streamed, held = _folder(digits.root, val_size=150), _folder(digits.root, val_size=150, in_memory=True)
    assert streamed.streamed and not held.streamed and streamed.mean == held.mean
    for seed in (0, 1):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        pairs = list(zip(train_batches(streamed, 100, a), train_batches(held, 100, b), strict=True))
        assert len(pairs) == -(-streamed.size("train") // 100)
        assert all(torch.equal(xs, xh) and torch.equal(ys, yh) for (xs, ys), (xh, yh) in pairs)
    for split in ("val", "test"):
        pairs = zip(eval_batches(streamed, split, 64, shard=(1, 3)), eval_batches(held, split, 64, shard=(1, 3)),
                    strict=True)
        assert all(torch.equal(xs, xh) and torch.equal(ys, yh) for (xs, ys), (xh, yh) in pairs)


def test_crop_flip_and_rank_shards_match_in_memory() -> None:
    """CIFAR-style augmentation and DDP shards: a streamed copy draws the same crops for the
    whole global batch and reads only this rank's rows."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(70, 3, 6, 6, generator=g), torch.randint(0, 4, (70,), generator=g)
    held = dataclasses.replace(_synthetic(x, y), augment="crop_flip")
    streamed = held.streamed_copy(num_workers=WORKERS)

    def epoch(data: object, shard: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(train_batches(data, 16, torch.Generator().manual_seed(5), shard=shard))

    whole = epoch(held, (0, 1))
    assert len(whole) == 5 and not torch.equal(whole[0][0], normalize(x[:16], [0.5] * 3, [0.25] * 3))
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(whole, epoch(streamed, (0, 1)),
                                                                                   strict=True))
    ranks = [epoch(streamed, (r, 3)) for r in range(3)]
    for i, (x_all, y_all) in enumerate(whole):  # the ranks' parts of each batch make the batch
        assert torch.equal(torch.cat([ranks[r][i][0] for r in range(3)]), x_all)
        assert torch.equal(torch.cat([ranks[r][i][1] for r in range(3)]), y_all)
        assert all(torch.equal(ranks[r][i][0], epoch(held, (r, 3))[i][0]) for r in range(3))


def _synthetic(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    from modeconn.training.core.data import Dataset

    return Dataset("synthetic", x, y, x[:0], y[:0], x[:10], y[:10], [0.5] * 3, [0.25] * 3, [str(i) for i in range(4)])


class SmallCNN(nn.Module):
    """A network with BatchNorm for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_training_streamed_and_in_memory_gives_the_same_weights(digits: DigitsFolder, tmp_path: Path) -> None:
    """The real training loop (training/core/loop.py fit), a few steps into a second epoch, then
    BN recomputed and the test split predicted: the same numbers from both copies."""
    from modeconn.training.core.loop import FitPlan, fit

    trained = {}
    for name, in_memory in (("streamed", False), ("held", True)):
        data = _folder(digits.root, val_size=150, in_memory=in_memory)
        torch.manual_seed(0)
        model = SmallCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        plan = FitPlan(epochs=2, batch_size=128, learning_rate=lambda *_: 0.05, seed=1, max_iterations=12,
                       description="digits", save_every=100)
        rows = fit(plan, run_dir=tmp_path / name, model=model, optimizer=optimizer, data=data,
                   checkpoint_fields={"kind": "test"})
        assert rows[-1]["iteration"] == 12  # 11 batches of 128 per epoch: into the second epoch
        recompute_bn(model, data, batch_size=100)
        trained[name] = (model.state_dict(), predict_probs(model.eval(), data, "test"))
    (streamed_state, streamed_probs), (held_state, held_probs) = trained["streamed"], trained["held"]
    assert streamed_state.keys() == held_state.keys()
    assert all(torch.equal(streamed_state[k], held_state[k]) for k in streamed_state)
    assert torch.equal(streamed_probs, held_probs)
    # and training moved the weights (the comparison is not of two untouched networks)
    torch.manual_seed(0)
    assert not torch.equal(SmallCNN().state_dict()["body.0.weight"], streamed_state["body.0.weight"])


def test_resize_and_channels_settings(tmp_path: Path) -> None:
    """Mixed sizes and modes, read with resize and channels: each file as Pillow makes it."""
    rng = np.random.default_rng(0)
    files = {}
    for part in ("train", "test"):
        for c, (w, h) in enumerate(((12, 10), (7, 9))):
            folder = tmp_path / part / f"class{c}"
            folder.mkdir(parents=True)
            path = folder / "a.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files[part, c] = path
    data = build_dataset("image_folder", root=tmp_path, val_size=0, resize=[6, 5], channels=1, num_workers=0)
    assert data.input_shape == (1, 6, 5)
    for c in (0, 1):
        with Image.open(files["train", c]) as image:
            expected = np.asarray(image.convert("L").resize((5, 6), Image.Resampling.BILINEAR), np.float32) / 255.0
        assert np.array_equal(data.x_train.materialize()[c, 0].numpy(), expected)
    rgb = build_dataset("image_folder", root=tmp_path, val_size=0, resize=[6, 5], num_workers=0)
    assert rgb.input_shape == (3, 6, 5) and len(rgb.mean) == 3  # RGB files: 3 channels when not set


def test_served_upload_is_resized_exactly_as_training_read_the_file(tmp_path: Path) -> None:
    """A PNG of another size and mode, decoded by the service with the manifest's input.image,
    equals the training read of the same file (and Pillow's own convert + resize)."""
    from modeconn.serving.encodings import PNG, decode

    rng = np.random.default_rng(1)
    for part in ("train", "test"):
        (tmp_path / part / "only").mkdir(parents=True)
    upload = Image.fromarray(rng.integers(0, 256, (23, 17, 3), dtype=np.uint8))
    upload.save(tmp_path / "train" / "only" / "x.png")
    upload.save(tmp_path / "test" / "only" / "x.png")
    data = build_dataset("image_folder", root=tmp_path, val_size=0, resize=[8, 8], channels=1, num_workers=0)
    trained = data.x_test.materialize()[0].numpy()
    spec = InputSpec(shape=[1, 8, 8], dtype="float32", range=[0.0, 1.0],
                     image=ImageInput(channels=1, resize=[8, 8]))
    buf = io.BytesIO()
    upload.save(buf, format="PNG")
    served = decode(PNG, buf.getvalue(), (1, 8, 8), image=spec.image)[0]
    assert np.array_equal(served, trained)
    by_hand = np.asarray(upload.convert("L").resize((8, 8), Image.Resampling.BILINEAR), np.float32)[None] / 255.0
    assert np.array_equal(served, by_hand)
    assert np.array_equal(image_array(upload, 1, (8, 8)), by_hand)
    # without the recorded preprocessing the service refuses the size, as before
    from modeconn.serving.schemas import InputError

    with pytest.raises(InputError, match="it is not resized"):
        decode(PNG, buf.getvalue(), (1, 8, 8))
    from modeconn.serving.openapi import binary_bodies

    described = binary_bodies((1, 8, 8), (0.0, 1.0), 64, spec.image)[PNG]["description"]
    assert "any size" in described and "resized to 8x8" in described


def test_manifest_refuses_an_image_section_that_does_not_fit_the_shape() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="3-channel images"):
        InputSpec(shape=[1, 8, 8], dtype="float32", range=[0.0, 1.0], image=ImageInput(channels=3))
    with pytest.raises(ValidationError, match="differs from input.shape"):
        InputSpec(shape=[1, 8, 8], dtype="float32", range=[0.0, 1.0], image=ImageInput(channels=1, resize=[4, 4]))


# -- arrays ----------------------------------------------------------------------------------------
def test_arrays_npz_and_npy_folders_of_any_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3, 4)).astype(np.float64), rng.integers(0, 3, 50)
    xt, yt = rng.normal(size=(20, 3, 4)), rng.integers(0, 3, 20)
    np.savez(tmp_path / "train.npz", x=x, y=y, class_names=np.array(["a", "b", "c"]))
    (tmp_path / "test").mkdir()
    np.save(tmp_path / "test" / "x.npy", xt)
    np.save(tmp_path / "test" / "y.npy", yt)
    data = build_dataset("arrays", root=tmp_path, train="train.npz", test="test", val_size=10, split_seed=2)
    assert not data.streamed and data.input_shape == (3, 4) and data.class_names == ["a", "b", "c"]
    _, _, x_val, y_val = hold_out(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), 10, 2)
    assert torch.equal(data.x_val, x_val) and torch.equal(data.y_val, y_val)
    assert torch.equal(data.x_test, torch.from_numpy(xt.astype(np.float32)))
    train_rows = torch.from_numpy(x.astype(np.float32))[hold_out(torch.arange(50), torch.arange(50), 10, 2)[0]]
    # normalisation per entry of axis 1 (here 3 channels of length-4 signals)
    expected_mean = train_rows.double().transpose(0, 1).reshape(3, -1).mean(1)
    assert data.mean == pytest.approx(expected_mean.tolist(), rel=1e-9)
    assert data.value_range == (float(min(x.astype(np.float32).min(), xt.astype(np.float32).min())),
                                float(max(x.astype(np.float32).max(), xt.astype(np.float32).max())))
    streamed = build_dataset("arrays", root=tmp_path, train="train.npz", test="test", val_size=10, split_seed=2,
                             in_memory=False, num_workers=WORKERS)
    assert streamed.streamed and torch.equal(streamed.x_val.materialize(), data.x_val)


def test_arrays_from_a_config_and_a_checkpoint_record(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tr.npz", x=rng.normal(size=(30, 5)), y=rng.integers(0, 2, 30))
    np.savez(tmp_path / "te.npz", x=rng.normal(size=(10, 5)), y=rng.integers(0, 2, 10))
    config = load_config(None, {"data.name": "arrays", "data.train": str(tmp_path / "tr.npz"),
                                "data.test": str(tmp_path / "te.npz"), "data.val_size": 5})
    from modeconn.training.core.networks import config_specs, dataset_spec

    data = load_data(dataset_spec(config.data), "cpu")
    _, record = config_specs(config.model, config.data, data)
    again = load_data(json.loads(json.dumps(record)), "cpu")  # a checkpoint's record, as stored
    assert torch.equal(again.x_train, data.x_train) and again.mean == data.mean and again.std == data.std


# -- any torch Dataset / DataLoader ----------------------------------------------------------------
def test_dataset_from_torch_streams_or_holds_the_same_data() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 2, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    xt, yt = torch.rand(12, 2, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    train, test = TensorDataset(x, y), DataLoader(TensorDataset(xt, yt), batch_size=7, num_workers=WORKERS)
    held = dataset_from_torch(train, test, class_names=["a", "b", "c"], normalize=True)
    assert not held.streamed and torch.equal(held.x_train, x) and torch.equal(held.y_test, yt)
    assert held.size("val") == 0 and held.class_names == ["a", "b", "c"]
    assert held.mean == pytest.approx(x.double().transpose(0, 1).reshape(2, -1).mean(1).tolist(), rel=1e-12)
    streamed = dataset_from_torch(train, test, val=TensorDataset(xt[:4], yt[:4]), name="mine", in_memory=False,
                                  normalize=True)
    assert streamed.streamed and streamed.name == "mine" and streamed.x_test.num_workers == WORKERS
    assert torch.equal(streamed.x_val.materialize(), xt[:4]) and streamed.class_names == ["0", "1", "2"]
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert all(torch.equal(p, q) for (p, _), (q, _) in zip(train_batches(held, 8, a), train_batches(streamed, 8, b),
                                                          strict=True))
    # by default the inputs are what the network takes: no normalisation, an empty test split allowed
    plain = dataset_from_torch(train)
    assert plain.mean == [0.0] and plain.std == [1.0] and plain.size("test") == 0
    assert all(torch.equal(p, x[i]) for (p, _), i in zip(eval_batches(plain, "train", 40), [slice(0, 40)], strict=True))


def test_dataset_from_torch_refuses_what_it_cannot_use() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204
            yield torch.zeros(2), 0

    with pytest.raises(DataError, match="train: needs a map-style torch Dataset"):
        dataset_from_torch(Stream(), TensorDataset(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(DataError, match="test: items must be"):
        dataset_from_torch(TensorDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)),
                           TensorDataset(torch.zeros(3, 2)))


# -- bad input: one line naming the thing ----------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(path)


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError) as err:
        build_dataset("image_folder", root=tmp_path)
    assert f"{tmp_path / 'train'} has no class folders" in _one_line(err)


def test_image_folder_with_a_class_missing_from_test(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        _png(tmp_path / "train" / c / "a.png")
    _png(tmp_path / "test" / "cat" / "a.png")
    with pytest.raises(DataError) as err:
        build_dataset("image_folder", root=tmp_path)
    assert "has no folder for class 'dog'" in _one_line(err)


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    for part in ("train", "test"):
        _png(tmp_path / part / "c" / "a.png")
    bad = tmp_path / "train" / "c" / "b.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as err:
        build_dataset("image_folder", root=tmp_path, val_size=0)
    assert _one_line(err).startswith(f"{bad}: not a readable image")


def test_a_truncated_image_is_named_from_a_loader_worker(tmp_path: Path) -> None:
    """The header reads fine, the pixels do not: found while streaming, in a worker process."""
    for part in ("train", "test"):
        _png(tmp_path / part / "c" / "a.png", (32, 32))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    bad = tmp_path / "train" / "c" / "b.png"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    data = build_dataset("image_folder", root=tmp_path, val_size=0, mean=[0.5], std=[0.5], num_workers=WORKERS)
    with pytest.raises(DataError) as err:
        list(train_batches(data, 2, torch.Generator().manual_seed(0)))
    assert _one_line(err).startswith(f"{bad}: not a readable image")


def test_images_of_mixed_sizes_need_a_resize_setting(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "c" / "a.png", (8, 8))
    _png(tmp_path / "train" / "c" / "b.png", (9, 8))
    _png(tmp_path / "test" / "c" / "a.png", (8, 8))
    with pytest.raises(DataError) as err:
        build_dataset("image_folder", root=tmp_path, val_size=0)
    text = _one_line(err)
    assert "images of mixed sizes" in text and str(tmp_path / "train" / "c" / "b.png") in text and "data.resize" in text
    assert build_dataset("image_folder", root=tmp_path, val_size=0, resize=[8, 8]).input_shape == (1, 8, 8)


def test_arrays_whose_x_and_y_lengths_differ(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.zeros((10, 3)), y=np.zeros(9, np.int64))
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 3)), y=np.zeros(4, np.int64))
    with pytest.raises(DataError) as err:
        build_dataset("arrays", train=str(tmp_path / "train.npz"), test=str(tmp_path / "test.npz"))
    assert _one_line(err) == f"{tmp_path / 'train.npz'}: x has 10 rows but y has 9 labels (data.train)"


def test_a_pickled_npy_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    np.save(folder / "x.npy", np.array([{"payload": 1}] * 3, dtype=object), allow_pickle=True)
    np.save(folder / "y.npy", np.zeros(3, np.int64))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 1)), y=np.zeros(2, np.int64))
    with pytest.raises(DataError) as err:
        build_dataset("arrays", train=str(folder), test=str(tmp_path / "test.npz"))
    assert _one_line(err).startswith(f"{folder / 'x.npy'} holds Python objects (a pickled array); refused")


def _no_class_folders(root: Path) -> tuple[list[str], str]:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    return (["data.name=image_folder", f"data.root={root}"],
            f"{root / 'train'} has no class folders: put each class's images in train/<class>/")


def _class_missing_from_test(root: Path) -> tuple[list[str], str]:
    for c in ("cat", "dog"):
        _png(root / "train" / c / "a.png")
    _png(root / "test" / "cat" / "a.png")
    return ["data.name=image_folder", f"data.root={root}"], f"{root / 'test'} has no folder for class 'dog'"


def _corrupt_image(root: Path) -> tuple[list[str], str]:
    for part in ("train", "test"):
        _png(root / part / "c" / "a.png")
    (root / "test" / "c" / "b.png").write_bytes(b"not a png at all")
    return ["data.name=image_folder", f"data.root={root}"], f"{root / 'test' / 'c' / 'b.png'}: not a readable image"


def _mixed_sizes(root: Path) -> tuple[list[str], str]:
    _png(root / "train" / "c" / "a.png", (8, 8))
    _png(root / "train" / "c" / "b.png", (9, 8))
    _png(root / "test" / "c" / "a.png", (8, 8))
    return ["data.name=image_folder", f"data.root={root}"], f"images of mixed sizes: {root / 'train' / 'c' / 'b.png'}"


def _arrays_of_different_lengths(root: Path) -> tuple[list[str], str]:
    root.mkdir()
    np.savez(root / "train.npz", x=np.zeros((10, 3)), y=np.zeros(9, np.int64))
    np.savez(root / "test.npz", x=np.zeros((4, 3)), y=np.zeros(4, np.int64))
    return (["data.name=arrays", f"data.train={root / 'train.npz'}", f"data.test={root / 'test.npz'}"],
            f"{root / 'train.npz'}: x has 10 rows but y has 9 labels (data.train)")


@pytest.mark.parametrize("case", [_no_class_folders, _class_missing_from_test, _corrupt_image, _mixed_sizes,
                                  _arrays_of_different_lengths], ids=lambda case: case.__name__.strip("_"))
def test_the_cli_prints_one_line_exits_2_and_writes_nothing(
    case, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    from modeconn.training import cli

    settings, message = case(tmp_path / "data")
    for command in ("train", "sse"):
        out = tmp_path / command
        code = cli.main([command, "--out", str(out), "--set", "device=cpu",
                         *(arg for s in settings for arg in ("--set", s))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not out.exists(), err
        assert "\n" not in err and err.startswith(f"modeconn {command}: error: {message}"), err


def test_the_readmes_own_model_and_data_config_trains(few_digits: DigitsFolder, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML of the README's "Your own model and data" section, as it is there (its data.root
    pointed at a digits folder): `modeconn train` from the repository root builds the example's
    network by import path and records the factory and the preprocessing."""
    import re

    from modeconn.training import cli
    from modeconn.training.core.checkpoint import load_checkpoint

    repo = Path(__file__).resolve().parents[1]
    section = (repo / "README.md").read_text().split("## Your own model and data\n", 1)[1].split("\n## ", 1)[0]
    assert "examples/own_model.py" in section
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    config = tmp_path / "own.yaml"
    config.write_text(block)
    monkeypatch.chdir(repo)  # where the import path resolves, as the README says
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--device", "cpu", "--set",
                     f"data.root={few_digits.root}", "--set", "train.epochs=1", "--set", "data.val_size=50"]) == 0
    state = load_checkpoint(out / "final.pt")
    assert state["architecture"] == {"factory": "examples.own_model:SmallCNN", "kwargs": {}}
    assert (state["dataset"]["name"], state["dataset"]["resize"], state["dataset"]["input_shape"]) == (
        "image_folder", [8, 8], [1, 8, 8])


# -- every stage over a streamed folder ------------------------------------------------------------
def test_every_stage_runs_over_the_streamed_digits_folder(few_digits: DigitsFolder, tmp_path: Path) -> None:
    """train, curve, eval-curve, FGE, plane and export on the PNG folder read through loader
    workers; the artifact records how the images were read. The registered PreResNet takes RGB:
    the grayscale digits are read as 3 channels (data.channels)."""
    from modeconn.contract.artifact import load_artifact
    from modeconn.training.core.checkpoint import load_checkpoint
    from modeconn.training.curves.evaluate import evaluate_curve
    from modeconn.training.curves.fit import fit_curve
    from modeconn.training.curves.plane import make_plane
    from modeconn.training.ensembles.fge import run_fge
    from modeconn.training.export import export_artifact
    from modeconn.training.train import train_network

    settings = {"device": "cpu", "data.name": "image_folder", "data.root": str(few_digits.root), "data.val_size": 60,
                "data.num_workers": WORKERS, "data.channels": 3, "model.name": "preresnet", "model.kwargs": {"depth": 8},
                "train.epochs": 2, "train.save_every": 1, "train.batch_size": 64, "curve.epochs": 1,
                "curve.batch_size": 64, "fge.epochs": 2.0, "fge.cycle_epochs": 1.0, "fge.batch_size": 64,
                # smaller steps than the demo's (the defaults) for this small PreResNet
                "curve.lr": 0.03, "fge.lr1": 0.05, "fge.lr2": 0.005}
    nets = [Path(train_network(load_config(None, {**settings, "seed": s}), tmp_path / f"net{s}")["checkpoint"])
            for s in (0, 1)]
    record = load_checkpoint(nets[0])["dataset"]
    assert (record["channels"], record["resize"], record["root"]) == (3, None, str(few_digits.root.resolve()))
    assert load_data(record, "cpu").streamed  # later commands rebuild the same, streamed
    config = load_config(None, settings)
    curve = Path(fit_curve(config, nets[0], nets[1], tmp_path / "curve")["run_dir"])
    headline = json.loads(Path(evaluate_curve(curve, points=3, device="cpu")["json"]).read_text())["headline"]
    assert 0 <= headline["curve_max_test_error"] <= 100
    fge = run_fge(config, sorted((tmp_path / "net0" / "checkpoints").glob("epoch-*.pt"))[0], tmp_path / "fge")
    snapshots = sorted((tmp_path / "fge" / "snapshots").glob("snapshot-*.pt"))
    assert len(snapshots) == 2 and 0 <= fge["ensemble"]["test_error"] <= 100
    plane = json.loads(Path(make_plane(run=curve, grid=3, device="cpu")["json"]).read_text())
    assert (plane["grid"], plane["train_size"], plane["test_size"]) == (3, len(few_digits.train_labels) - 60,
                                                                         len(few_digits.test_labels))
    assert all(0 <= p["test_error"] <= 100 for p in plane["points"])
    # one member (each ONNX export takes seconds), the ensemble and the curve
    export_artifact([snapshots[0], curve], "digits-test", out=tmp_path / "artifact", grid_points=3,
                    max_interpolation_pp=100)
    spec = load_artifact(tmp_path / "artifact").spec
    assert spec.input.shape == [3, 8, 8] and spec.input.image == ImageInput(channels=3, resize=None)
    assert spec.dataset.source == {"root": str(few_digits.root.resolve()), "channels": 3}
    assert spec.dataset.test_size == len(few_digits.test_labels) and spec.parity is not None
