"""Request bodies besides JSON: raw float32, .npy, and PNG/JPEG images; and `t`/`ts` from the
query string, and /predict's `model` and either route's `calibrated`, `coverage` and
`set_method` (binary bodies have no JSON fields to hold them).

| Content-Type               | body                                                             |
|----------------------------|------------------------------------------------------------------|
| application/octet-stream   | little-endian float32, C order; N = bytes / (4 x prod(shape))    |
| application/x-npy          | one .npy array (np.save), float32/float64/float16, shape          |
|                            | (N, *shape) or one sample of `shape`; no pickles                 |
| image/png, image/jpeg      | one image of the manifest's input shape (C, H, W), C = 1 or 3,   |
|                            | for models trained on images scaled to [0, 1] (input.range)      |

Decisions (README "HTTP API"):
- .npy: floating dtypes only. float64 and float16 are cast to float32 (as JSON numbers are);
  integer arrays are refused, since uint8 pixels sent as they are would be 255x off the
  [0, 1] values the model was trained on. Any byte order; Fortran order is made C order.
- Images: one per request (a batch of images is one .npy); the size must equal the
  manifest's H x W (no silent resize), checked from the header before any pixel is decoded;
  8-bit grayscale for C = 1, RGB (or a palette image, or RGBA with every pixel opaque) for
  C = 3; a multi-picture JPEG (MPO) is its first picture. Pixels are scaled to [0, 1] as the training
  data were (training/data.py: uint8 / 255); the graphs normalise with input.normalization
  themselves (docs/manifest.md), so decoding does not.
- A model trained on an image folder records how its images were read (manifest
  `input.image`): uploads are then read exactly so (modeconn/contract/images.py, the same code
  training used): converted to its channels whatever their mode, and resized to its `resize`
  when it has one (any size up to MAX_UPLOAD_PIXELS is taken).
Every problem is an InputError naming it (HTTP 400); the service answers 415 for a media
type the artifact cannot take (an image for a non-image model).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from modeconn.contract.images import image_array
from modeconn.contract.manifest import ImageInput

from .prediction_sets import SetRequest
from .schemas import MAX_REQUEST_ROWS, MAX_TS, MODELS, SETS_NEED_ONE_T, InputError, check_values

RAW = "application/octet-stream"
NPY = "application/x-npy"
PNG = "image/png"
JPEG = "image/jpeg"
IMAGE_TYPES = {PNG: "PNG", JPEG: "JPEG"}  # media type -> Pillow's format name
# Pillow opens a JPEG holding several pictures (Multi-Picture Format: cameras' previews, stereo
# pairs) as "MPO"; its first frame, the one decoded, is the primary picture, a plain JPEG
_FORMAT_ALIASES = {"MPO": "JPEG"}
BINARY_TYPES = (RAW, NPY, PNG, JPEG)
_FLOAT_KINDS = ("f2", "f4", "f8")
# the largest upload that is resized (about 64 MB decoded as RGBA); checked from the header
MAX_UPLOAD_PIXELS = 4096 * 4096


def media_type(content_type: str) -> str:
    """"Image/PNG; charset=x" -> "image/png"."""
    return content_type.split(";", 1)[0].strip().lower()


def image_shape(shape: tuple[int, ...], value_range: tuple[float, float]) -> tuple[int, int, int] | None:
    """(C, H, W) when the artifact takes images: a 3-d input of 1 or 3 channels whose
    training data were in [0, 1]; else None."""
    if len(shape) == 3 and shape[0] in (1, 3) and tuple(value_range) == (0.0, 1.0):
        return shape  # type: ignore[return-value]
    return None


def decode(kind: str, body: bytes, shape: tuple[int, ...], max_rows: int = MAX_REQUEST_ROWS,
           image: ImageInput | None = None) -> np.ndarray:
    """The body of media type `kind` (one of BINARY_TYPES) as checked float32 [N, *shape];
    `image`: how training read its image files (manifest input.image), applied to images."""
    if kind == RAW:
        values = decode_raw(body, shape)
    elif kind == NPY:
        values = decode_npy(body, shape)
    else:
        values = decode_image(body, kind, shape, image)[None]
    if len(values) > max_rows:
        raise InputError(f"the body holds {len(values)} rows; the maximum per request is {max_rows}")
    return check_values(values)


def decode_raw(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    row_bytes = 4 * math.prod(shape)
    if not body:
        raise InputError("the body is empty; send at least one row of float32 values")
    if len(body) % row_bytes:
        raise InputError(
            f"the body has {len(body)} bytes, not a multiple of one row: "
            f"{row_bytes} bytes = 4 x {' x '.join(map(str, shape))} float32 values"
        )
    return np.frombuffer(body, dtype="<f4").reshape(-1, *shape)


def decode_npy(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # an object array: numpy would need pickle
            raise InputError(f"the .npy array holds Python objects (pickles are refused): {exc}") from None
        raise InputError(f"the body is not a readable .npy file: {exc}") from None
    except Exception as exc:  # truncated or not .npy at all: numpy raises several types
        raise InputError(f"the body is not a readable .npy file ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):  # np.load also reads .npz archives
        raise InputError("the body is an .npz archive; send one .npy array")
    if array.dtype.kind != "f" or f"f{array.dtype.itemsize}" not in _FLOAT_KINDS:
        raise InputError(
            f"the .npy array has dtype {array.dtype}; send float32 (float64 and float16 are "
            "cast; integers are refused: scale pixels to the model's input range first)"
        )
    if array.shape == tuple(shape):
        array = array[None]  # one sample
    if array.shape[1:] != tuple(shape) or array.ndim != len(shape) + 1:
        raise InputError(
            f"the .npy array has shape {list(array.shape)}; expected [N, {', '.join(map(str, shape))}]"
            f" or one sample of shape {list(shape)}"
        )
    if not len(array):
        raise InputError("the .npy array has no rows; send at least one")
    return array


def decode_image(body: bytes, kind: str, shape: tuple[int, ...], image: ImageInput | None = None) -> np.ndarray:
    """One PNG/JPEG image as float32 [C, H, W] in [0, 1]; the caller checked the model takes
    images. With `image` (the manifest's input.image) it is read as the training images were."""
    from PIL import Image  # deferred: only image artifacts need Pillow

    channels, height, width = shape
    expected = IMAGE_TYPES[kind]
    # open reads the header only; the pixels are decoded once format and size are right, since
    # a body of a few hundred KB can declare a 9000x9000 picture (about 240 MB decoded)
    picture = _readable(lambda: Image.open(io.BytesIO(body)), expected)
    if _FORMAT_ALIASES.get(picture.format, picture.format) != expected:
        raise InputError(f"the body is a {picture.format} image, but the content type says {kind}")
    resized = image is not None and image.resize is not None
    if resized and picture.size[0] * picture.size[1] > MAX_UPLOAD_PIXELS:
        raise InputError(f"the image is {picture.size[0]}x{picture.size[1]} (width x height); at most "
                         f"{MAX_UPLOAD_PIXELS} pixels are taken (this model resizes to {width}x{height})")
    if not resized and picture.size != (width, height):
        raise InputError(
            f"the image is {picture.size[0]}x{picture.size[1]} (width x height); this model takes "
            f"{width}x{height} (it is not resized)"
        )
    _readable(picture.load, expected)  # a corrupt file fails here, not later
    if image is not None:  # exactly as training read its files
        return _readable(lambda: image_array(picture, image.channels, image.resize), expected)
    return _pixels(picture, channels)


def _readable(step: Callable[[], Any], expected: str) -> Any:
    """`step()`, Pillow's many ways of failing on a bad file turned into one InputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        return step()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"the body is not a readable {expected} image ({exc})") from None


def _pixels(image: object, channels: int) -> np.ndarray:
    from PIL import Image

    assert isinstance(image, Image.Image)
    mode = image.mode
    if mode == "P":  # palette: its colours are what the picture shows
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "RGBA":
        if np.asarray(image.getchannel("A")).min() < 255:
            raise InputError("the image has transparent pixels; send an opaque image")
        image, mode = image.convert("RGB"), "RGB"
    if mode == "1":
        image, mode = image.convert("L"), "L"
    wanted = {1: "L", 3: "RGB"}[channels]
    if mode != wanted:
        names = {"L": "8-bit grayscale", "RGB": "8-bit RGB"}
        raise InputError(
            f"the image has mode {mode!r}; this model takes {channels}-channel "
            f"{names[wanted]} images ({wanted})"
        )
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W] or [H, W, 3]
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


SET_PARAMS = {"coverage", "set_method"}


def curve_query(query: str) -> tuple[list[float], bool, SetRequest | None]:
    """`t=0.3` or `ts=0.2,0.5,0.8` from a query string (exactly one of them, each in [0, 1]),
    `calibrated=true|false` (default true), and `coverage` and `set_method` (with one t only)."""
    params = _query(query, {"t", "ts", "calibrated", *SET_PARAMS})
    if ("t" in params) == ("ts" in params):
        raise InputError("give exactly one of the query parameters t=0.3 or ts=0.2,0.5,0.8")
    name = "t" if "t" in params else "ts"
    texts = [params[name]] if name == "t" else params[name].split(",")
    if len(texts) > MAX_TS:
        raise InputError(f"ts has {len(texts)} values; at most {MAX_TS}")
    values = []
    for i, text in enumerate(texts):
        where = name if name == "t" else f"ts[{i}]"
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{where} = {text!r} is not a number") from None
        if not 0.0 <= value <= 1.0:  # also False for NaN
            raise InputError(f"{where} = {text!r} is not in [0, 1]")
        values.append(value)
    sets = _sets(params)
    if sets is not None and name == "ts":
        raise InputError(SETS_NEED_ONE_T)
    return values, _calibrated(params), sets


def predict_query(query: str) -> tuple[bool, str, SetRequest | None]:
    """/predict takes only `calibrated=true|false`, `model=ensemble|swa` (default ensemble),
    `coverage` and `set_method=aps|raps` in the query: refuse the rest rather than ignore it."""
    params = _query(query, {"calibrated", "model", *SET_PARAMS})
    model = params.get("model", "ensemble")
    if model not in MODELS:
        raise InputError(f"model = {model!r}: use {' or '.join(MODELS)}")
    return _calibrated(params), model, _sets(params)


def _sets(params: dict[str, str]) -> SetRequest | None:
    """`coverage=0.9` (a number in (0, 1)) and `set_method=aps|raps` (default aps; only with a coverage)."""
    if "coverage" not in params:
        if "set_method" in params:
            raise InputError("set_method is given without coverage; give the coverage the sets should have")
        return None
    text = params["coverage"]
    try:
        coverage = float(text)
    except ValueError:
        raise InputError(f"coverage = {text!r} is not a number") from None
    if not 0.0 < coverage < 1.0:  # also False for NaN
        raise InputError(f"coverage = {text!r} is not in (0, 1)")
    method = params.get("set_method", "aps")
    if method not in ("aps", "raps"):
        raise InputError(f"set_method = {method!r}: use aps or raps")
    return SetRequest(coverage, method)


def _calibrated(params: dict[str, str]) -> bool:
    text = params.get("calibrated", "true")
    if text not in ("true", "false"):
        raise InputError(f"calibrated = {text!r}: use true or false")
    return text == "true"


def _query(query: str, allowed: set[str]) -> dict[str, str]:
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InputError(f"the query string {query!r} is malformed") from None
    unknown = sorted(set(params) - allowed)
    if unknown:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise InputError(f"unknown query parameter {unknown[0]!r} (allowed: {allowed_text})")
    for name, values in params.items():
        if len(values) > 1:
            raise InputError(f"query parameter {name!r} is given {len(values)} times")
    return {name: values[0] for name, values in params.items()}
