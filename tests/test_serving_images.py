"""PNG and JPEG uploads to a real `bentoml serve` of an image-shaped artifact ("for
image artifacts PNG/JPEG uploads (decoded, checked against the manifest's input shape,
normalised as in training)").

The artifact (tests/support.py build_image_artifact): two PreResNet-8 networks with seeded
random weights, their BN statistics recomputed on a synthetic CIFAR-10 folder of 200 random
images and labels, 50 of which are the validation split the exporter fits the temperature
on, exported by the real exporter (about 15 s on 2 cores). The labels are random, so the
fitted T is at its bound (20) and the calibrated answers are near uniform: the raw ones
(?calibrated=false) are checked as well, and a one-grey-level change is shown to move both
by far more than the tolerance.

Expected answers never use the service's decoder: Pillow decodes the very bytes sent, the
pixels are divided by 255 as training/core/data.py does, and then (a) ensemble.onnx runs in
onnxruntime here (the graph normalises with input.normalization itself, docs/manifest.md)
with the manifest's temperature (tests/support.py Offline), and (b) the member checkpoints run
in PyTorch on pixels normalised here with the manifest's mean and std, as training feeds them.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from modeconn.training.core.networks import load_network
from tests.support import (
    CIFAR10_CLASSES,
    ImageArtifact,
    Offline,
    Server,
    build_image_artifact,
    start_server,
    stop_server,
    store_artifact,
    wait_all_ready,
)

MODEL = "modeconn-test-images"
SPEC = ImageArtifact(members=2, depth=8, train=200, test=64, val_size=50)
TOL = 1e-6
PNG, JPEG, NPY = "image/png", "image/jpeg", "application/x-npy"
Members = list[torch.nn.Module]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_artifact(tmp_path_factory.mktemp("image-artifact"), MODEL, SPEC)


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("image-serving")
    store_artifact(artifact, MODEL, tmp / "bentoml")
    served = start_server(tmp / "bentoml", MODEL, tmp / "server.log", MODECONN_WORKERS="1")
    try:
        wait_all_ready(served)
        yield served
    finally:
        stop_server(served)


@pytest.fixture(scope="module")
def offline(artifact: Path) -> Offline:
    return Offline(artifact)


@pytest.fixture(scope="module")
def manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


@pytest.fixture(scope="module")
def members(manifest: dict) -> Members:
    """The exported networks as PyTorch modules, from the checkpoints the manifest names."""
    return [load_network(m["source"])[0] for m in manifest["members"]]


# -- helpers --------------------------------------------------------------------------------


def _picture(seed: int, smooth: bool = False) -> np.ndarray:
    """[32, 32, 3] uint8: uniform noise, or a colour gradient with a little noise (which JPEG
    keeps close to, though not exactly)."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rows, cols = np.mgrid[0:32, 0:32] * 6.0
    base = np.stack([20 + rows, 20 + cols, 220 - (rows + cols) / 2], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _decoded(body: bytes) -> np.ndarray:
    """[1, 3, H, W] float32: Pillow's RGB pixels of `body` (an MPO's first picture) / 255."""
    pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    return (pixels.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def _post(server: Server, body: bytes, content_type: str, query: str = "") -> requests.Response:
    return requests.post(f"{server.url}/predict{query}", data=body, headers={"content-type": content_type},
                         timeout=60)


def _torch_reference(members: Members, manifest: dict, x: np.ndarray) -> np.ndarray:
    """Mean softmax of the PyTorch networks on x normalised here with the manifest's mean/std."""
    norm = manifest["input"]["normalization"]
    mean, std = (np.asarray(norm[k], np.float32)[None, :, None, None] for k in ("mean", "std"))
    z = torch.from_numpy((x - mean) / std)
    with torch.no_grad():
        return torch.stack([torch.softmax(net(z), dim=1) for net in members]).mean(dim=0).numpy()


def _check_served(server: Server, offline: Offline, members: Members, manifest: dict,
                  body: bytes, content_type: str) -> np.ndarray:
    """Both answers (calibrated and raw) to `body` equal the offline ones on Pillow's pixels of
    it; returns the raw probabilities."""
    x = _decoded(body)
    answers = {}
    for calibrated in (True, False):
        r = _post(server, body, content_type, "" if calibrated else "?calibrated=false")
        assert r.status_code == 200, r.text
        answer = r.json()
        probs = np.asarray(answer["probabilities"])
        want, _ = offline.predict(x, calibrated)
        np.testing.assert_allclose(probs, want, atol=TOL, rtol=0)
        assert answer["labels"] == [CIFAR10_CLASSES[int(i)] for i in want.argmax(axis=1)]
        answers[calibrated] = probs
    np.testing.assert_allclose(answers[False], _torch_reference(members, manifest, x), atol=TOL, rtol=0)
    return answers[False]


def _declaring(png: bytes, width: int, height: int) -> bytes:
    """`png` with a header (IHDR, CRC fixed) declaring width x height; its pixel data stay the
    small image's, so decoding it fails and only the header can say the size is wrong."""
    assert png[12:16] == b"IHDR"
    chunk = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


# -- tests ----------------------------------------------------------------------------------


def test_info_offers_image_types_for_the_image_artifact(server: Server, manifest: dict) -> None:
    card = requests.get(server.url + "/info", timeout=30).json()
    assert card["input"]["shape"] == [3, 32, 32] == manifest["input"]["shape"]
    assert card["input"]["range"] == [0.0, 1.0]
    assert {PNG, JPEG} <= set(card["limits"]["content_types"])
    assert card["dataset"]["class_names"] == CIFAR10_CLASSES
    assert manifest["ensemble"]["calibration"]["temperature"] != 1.0  # the calibrated path is exercised


def test_png_is_answered_as_offline_on_its_pixels(server: Server, offline: Offline, members: Members,
                                                  manifest: dict) -> None:
    pixels = _picture(1)
    body = _encode(Image.fromarray(pixels), "PNG")
    np.testing.assert_array_equal(_decoded(body)[0], pixels.transpose(2, 0, 1) / np.float32(255))  # lossless
    _check_served(server, offline, members, manifest, body, PNG)
    # the comparison would see one grey level too many in every pixel (a decoding slip)
    x = _decoded(body)
    brighter = np.minimum(x + np.float32(1 / 255), 1)
    for calibrated in (True, False):
        assert np.abs(offline.predict(brighter, calibrated)[0] - offline.predict(x, calibrated)[0]).max() > 10 * TOL


def test_jpeg_is_answered_as_offline_on_its_decoded_pixels(server: Server, offline: Offline, members: Members,
                                                           manifest: dict) -> None:
    pixels = _picture(2, smooth=True)
    body = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    lossy = np.abs(_decoded(body)[0] * 255 - pixels.transpose(2, 0, 1)).max()
    assert 0 < lossy < 40  # JPEG changed the pixels a little: the reference is what was decoded
    _check_served(server, offline, members, manifest, body, JPEG)


def test_palette_png_and_multi_picture_jpeg_are_their_rgb_picture(server: Server, offline: Offline,
                                                                  members: Members, manifest: dict) -> None:
    palette = Image.fromarray(_picture(3, smooth=True)).quantize(colors=64)
    assert palette.mode == "P"
    _check_served(server, offline, members, manifest, _encode(palette, "PNG"), PNG)
    first, second = Image.fromarray(_picture(4, smooth=True)), Image.fromarray(_picture(5))
    mpo = _encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"  # what Pillow makes of such a camera file
    # its first picture is the plain JPEG of `first`: the answer is that JPEG's
    np.testing.assert_array_equal(_decoded(mpo), _decoded(_encode(first, "JPEG", quality=90)))
    _check_served(server, offline, members, manifest, mpo, JPEG)


def test_a_batch_of_images_is_one_npy_with_the_single_answers(server: Server, offline: Offline) -> None:
    """The encoder takes one image per request (README); a batch is one .npy of the pixels."""
    bodies = [(_encode(Image.fromarray(_picture(1)), "PNG"), PNG),
              (_encode(Image.fromarray(_picture(2, smooth=True)), "JPEG", quality=90), JPEG)]
    singles = [np.asarray(_post(server, body, kind, "?calibrated=false").json()["probabilities"])
               for body, kind in bodies]
    batch = np.concatenate([_decoded(body) for body, _ in bodies])
    buffer = io.BytesIO()
    np.save(buffer, batch)
    r = _post(server, buffer.getvalue(), NPY, "?calibrated=false")
    assert r.status_code == 200, r.text
    probs = np.asarray(r.json()["probabilities"])
    np.testing.assert_allclose(probs, np.concatenate(singles), atol=TOL, rtol=0)
    np.testing.assert_allclose(probs, offline.predict(batch, calibrated=False)[0], atol=TOL, rtol=0)


def _bad_images() -> dict[str, tuple[bytes, str, str]]:
    rgb = Image.fromarray(_picture(6))
    png, jpeg = _encode(rgb, "PNG"), _encode(rgb, "JPEG", quality=90)
    rgba = np.dstack([_picture(6), np.full((32, 32), 128, np.uint8)])
    return {
        "wrong-size": (_encode(Image.fromarray(_picture(7)[:30]), "PNG"), PNG,
                       "the image is 32x30 (width x height); this model takes 32x32"),
        # refused from its header, before 9000 x 9000 pixels are decoded (they are not there)
        "declares-9000x9000": (_declaring(png, 9000, 9000), PNG, "the image is 9000x9000"),
        "grayscale-png": (_encode(rgb.convert("L"), "PNG"), PNG,
                          "mode 'L'; this model takes 3-channel 8-bit RGB images"),
        "grayscale-jpeg": (_encode(rgb.convert("L"), "JPEG"), JPEG, "mode 'L'; this model takes 3-channel"),
        "transparent": (_encode(Image.fromarray(rgba), "PNG"), PNG, "transparent pixels"),
        "corrupt-png": (png[: len(png) // 2], PNG, "not a readable PNG image"),
        "corrupt-jpeg": (jpeg[: len(jpeg) // 2], JPEG, "not a readable JPEG image"),
        "not-an-image": (b"GIF89a, or so it says", PNG, "not a readable PNG image"),
        "png-labelled-jpeg": (png, JPEG, "a PNG image, but the content type says image/jpeg"),
    }


@pytest.mark.parametrize("case", list(_bad_images()))
def test_bad_images_are_400_naming_the_problem(server: Server, case: str) -> None:
    body, kind, words = _bad_images()[case]
    r = _post(server, body, kind)
    assert r.status_code == 400, (r.status_code, r.text)
    assert words in r.json()["error"], r.json()
