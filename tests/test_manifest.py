"""The one manifest model (modeconn/contract/manifest.py): what the exporter writes is exactly the model,
the loader refuses bad fields naming them, format 1 and format 2 without `swa` still load, and
docs/manifest.md's tables are the model's JSON schema."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modeconn.contract.artifact import load_artifact
from modeconn.contract.manifest import (
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    parse_manifest,
    schema_markdown,
    with_generated_tables,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(built_artifact: Path) -> dict[str, Any]:
    return json.loads((built_artifact / "manifest.json").read_text())


def test_docs_tables_are_the_schema() -> None:
    doc = (ROOT / "docs/manifest.md").read_text(encoding="utf-8")
    assert with_generated_tables(doc) == doc, "run `python -m modeconn.contract.manifest --write docs/manifest.md`"
    tables = schema_markdown()
    for field in ("`parity`", "`normalization`", "`bn_interpolation`", "`kind`", "`calibration`", "`temperatures`",
                  "`swa`", "`averaged`"):
        assert field in tables  # the fields the hand-written doc had lost


def test_serving_side_imports_no_torch() -> None:
    code = "import sys, modeconn.contract.manifest, modeconn.contract.artifact, modeconn.serving.calibration, modeconn.serving.prediction_sets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_exported_manifest_is_the_model(exported: dict[str, Any], built_artifact: Path) -> None:
    assert exported["format_version"] == FORMAT_VERSION == 2
    spec = Manifest.model_validate(exported)
    dumped = spec.model_dump(mode="json")
    for section, key in ((dumped["input"], "image"), (dumped["dataset"], "source")):
        assert section.pop(key) is None  # files-based data only; left out of the file when empty
    assert dumped == exported  # nothing written outside the model, nothing dropped
    assert load_artifact(built_artifact).spec == spec
    assert all(m.kind == "curve-point" and m.calibration is not None for m in spec.members)
    assert spec.curve is not None and spec.curve.calibration is not None
    assert len(spec.curve_temperatures or []) == spec.curve.bn_grid_points == 11
    assert spec.swa is not None and spec.swa.file == "swa.onnx" and spec.swa.file in spec.files
    assert spec.swa.kind == "swa" and spec.swa.calibration is not None
    assert spec.swa_temperature == spec.swa.calibration.temperature != spec.ensemble_temperature


def test_format_2_without_swa_still_loads(exported: dict[str, Any], built_artifact: Path, tmp_path: Path) -> None:
    """An artifact exported before the `swa` section (or without --swa): no key, no swa.onnx."""
    old = copy.deepcopy(exported)
    del old["swa"], old["files"]["swa.onnx"]
    assert parse_manifest(old).swa is None and parse_manifest(old).swa_temperature is None
    assert parse_manifest({**old, "swa": None}).swa is None
    copy_dir = Path(shutil.copytree(built_artifact, tmp_path / "no-swa"))
    (copy_dir / "swa.onnx").unlink()
    (copy_dir / "manifest.json").write_text(json.dumps(old))
    artifact = load_artifact(copy_dir)
    assert not artifact.has_swa and artifact.swa_file is None and artifact.num_members == 3
    from modeconn.serving.openapi import (
        openapi_document,  # its document offers /predict's ensemble only
    )

    schemas = openapi_document(artifact, max_body_bytes=1 << 20)["components"]["schemas"]
    assert schemas["PredictRequest"]["properties"]["model"]["enum"] == ["ensemble"]


def _without_calibration(manifest: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(manifest)
    old["format_version"] = 1
    del old["swa"]  # came after format 1
    for section in (*old["members"], old["ensemble"], old["curve"]):
        del section["calibration"]
        section.pop("prediction_sets", None)  # came after format 1
    return old


def test_format_1_is_read_without_temperatures(exported: dict[str, Any], built_artifact: Path, tmp_path: Path) -> None:
    spec = parse_manifest(_without_calibration(exported))
    assert spec.format_version == 1 and spec.ensemble_temperature is None and spec.curve_temperatures is None
    copy_dir = Path(shutil.copytree(built_artifact, tmp_path / "v1"))
    (copy_dir / "manifest.json").write_text(json.dumps(_without_calibration(exported)))
    assert load_artifact(copy_dir).spec.ensemble.calibration is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=3), "format_version is 3; this loader reads 1, 2"),
        (lambda m: m.update(format_version="2"), "format_version is '2'"),
        (lambda m: m["members"][1]["metrics"].update(nll="0.5"), r"members\[1\]\.metrics\.nll"),
        (lambda m: m["members"][0].update(colour="red"), r"members\[0\]\.colour: Extra inputs"),
        (lambda m: m["ensemble"]["calibration"].update(temperature=0.0), r"ensemble\.calibration\.temperature"),
        (lambda m: m["ensemble"]["calibration"].pop("val_nll"), r"ensemble\.calibration\.val_nll: missing field"),
        (lambda m: m["curve"]["calibration"]["temperatures"].pop(), "temperatures has 10 entries; bn_grid_points is 11"),
        (lambda m: m["input"].update(shape=[40, 0]), "input.shape must be a non-empty list of positive ints"),
        (lambda m: m["input"].update(range=[1.0, float("nan")]), r"input\.range\[1\]"),
        (lambda m: m["files"]["ensemble.onnx"].update(bytes=True), r"files\['ensemble\.onnx'\]\.bytes"),
        (lambda m: m["dataset"].update(class_names=["a"]), "class_names has 1 entries; num_classes is 10"),
        (lambda m: m.update(curve={**m["curve"], "file": "elsewhere.onnx"}), "curve: file 'elsewhere.onnx' is not listed"),
        (lambda m: m["swa"].update(file="elsewhere.onnx"), "swa: file 'elsewhere.onnx' is not listed"),
        (lambda m: m["swa"].update(colour="red"), r"swa\.colour: Extra inputs"),
        (lambda m: m["swa"]["calibration"].update(temperature=-1.0), r"swa\.calibration\.temperature"),
    ],
)  # fmt: skip
def test_bad_fields_are_refused_by_name(exported: dict[str, Any], edit: Any, message: str) -> None:
    manifest = copy.deepcopy(exported)
    edit(manifest)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(manifest)
