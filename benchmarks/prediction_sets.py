"""Split-conformal prediction sets on the TEST split: the ensemble against one network.

For an exported artifact (the demo's: `modeconn pipeline --out DIR`), the data set is made again
from the manifest (name, validation size, split seed, generation), the ensemble graph is run with
onnxruntime on the validation and test splits (its mean and every member's probabilities), and
for the ensemble and each member: the temperature is fitted on validation and the APS and RAPS
thresholds calibrated there exactly as the exporter does (training/ensembles/conformal.py); then,
on the test split, the empirical coverage at each target with a 95 % Clopper-Pearson interval
(over the test examples, for these thresholds: it says nothing of the spread over calibration
sets, which is about sqrt(c(1 - c) / n_calibration)), and the mean set size. The ensemble's rows
are also checked against the numbers the exporter stored in the manifest.

    python benchmarks/prediction_sets.py /path/to/artifact
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import beta

from modeconn.contract.conformal import input_uniforms, set_mask
from modeconn.training.core.networks import load_data
from modeconn.training.ensembles.calibration import calibrate, fit_temperature
from modeconn.training.ensembles.conformal import prediction_sets

TARGETS = (0.8, 0.9, 0.95)


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(a, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - a, successes + 1, n - successes))
    return low, high


def probabilities(artifact: Path, x: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble graph's mean [N, C] and members' [M, N, C] probabilities."""
    session = ort.InferenceSession(str(artifact / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {"x": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts], axis=1)


def evaluate(name: str, val: np.ndarray, test: np.ndarray, y_val: torch.Tensor, y_test: torch.Tensor,
             u_val: np.ndarray, u_test: np.ndarray) -> tuple[dict[str, Any], list[list[Any]]]:
    val_t, test_t = torch.from_numpy(val).double(), torch.from_numpy(test).double()
    temperature = fit_temperature(val_t, y_val)
    fields = prediction_sets(val_t, y_val, u_val, temperature, test_t, y_test, u_test)
    assert fields is not None, "the validation split is too small for any coverage"
    n = len(y_test)
    accuracy = float((test.argmax(axis=1) == y_test.numpy()).mean())
    calibrated = calibrate(test_t, temperature).numpy()
    params = {"aps": (0, 0.0), "raps": (fields["raps_k_reg"], fields["raps_penalty"])}
    empty = {method: [float((~set_mask(calibrated, u_test, tau, *params[method]).any(axis=1)).mean())
                      for tau in fields[method]] for method in params}
    rows = []
    for method in ("aps", "raps"):
        for target in TARGETS:
            i = fields["coverages"].index(target)
            got = fields["test_coverage"][method][i]
            low, high = clopper_pearson(round(got * n), n)
            rows.append([name, method, target, f"{100 * got:.2f}", f"[{100 * low:.2f}, {100 * high:.2f}]",
                         f"{100 * (got - target):+.2f}", "yes" if abs(got - target) <= 0.015 else "no",
                         f"{fields['test_mean_size'][method][i]:.3f}", f"{100 * empty[method][i]:.2f}",
                         f"{100 * accuracy:.2f}"])
    return {"temperature": temperature, "accuracy": accuracy, "test_empty": empty, **fields}, rows


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="an exported artifact folder (modeconn export --out)")
    parser.add_argument("--label", default="demo", help="what the artifact is, for the results' name and text")
    args = parser.parse_args()
    run = common.start_run(f"prediction_sets-{args.label}")
    run["command"] = common.command_line()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    info = manifest["dataset"]
    data = load_data({k: info.get(k) for k in ("name", "val_size", "split_seed", "generation")}, "cpu")
    val_mean, val_members = probabilities(args.artifact, data.x_val.numpy())
    test_mean, test_members = probabilities(args.artifact, data.x_test.numpy())
    u_val, u_test = input_uniforms(data.x_val.numpy()), input_uniforms(data.x_test.numpy())
    models = {"ensemble": (val_mean, test_mean)}
    models.update({f"member {i}": (val_members[i], test_members[i]) for i in range(len(val_members))})
    results, rows = {}, []
    for name, (val, test) in models.items():
        results[name], model_rows = evaluate(name, val, test, data.y_val, data.y_test, u_val, u_test)
        rows += model_rows
    stored = manifest["ensemble"].get("prediction_sets")
    if stored is not None:  # the exporter's own numbers (torch probabilities): the same up to ties
        for method in ("aps", "raps"):
            diff = np.abs(np.subtract(stored["test_coverage"][method], results["ensemble"]["test_coverage"][method]))
            results["ensemble"][f"max_difference_from_manifest_{method}"] = float(diff.max())
    run["results"] = results
    run["sizes"] = {"val": len(data.y_val), "test": len(data.y_test), "members": len(val_members)}
    common.add_section(
        run, f"Test-split coverage ({len(data.y_test)} examples) and mean set size",
        ["model", "method", "target", "coverage %", "95 % CI (test sampling)", "minus target pp", "within 1.5 pp",
         "mean set size", "empty sets %", "top-1 accuracy %"], rows,
        notes=f"Thresholds calibrated on the validation split ({len(data.y_val)} examples: APS on all of it, RAPS "
        "on half B after choosing k_reg and penalty on half A), randomised scores with each input's u a hash of its "
        "values (modeconn/contract/conformal.py). Below the top-1 accuracy a target is met by empty sets. "
        "The interval covers test sampling for these thresholds only, not the spread over calibration sets "
        "(about sqrt(c (1 - c) / n_calibration): 0.9 pp at 0.9 with 1000, 1.3 pp with 500). Ensemble rows minus the "
        "exporter's stored numbers (largest difference): "
        + ", ".join(f"{m} {results['ensemble'].get(f'max_difference_from_manifest_{m}', 'n/a')}" for m in ("aps", "raps"))
        + ".")
    common.write_results(run, summary=f"Artifact `{manifest['name']}` ({args.label}): {len(val_members)} members, "
                         f"created {manifest['created_at']}.")


if __name__ == "__main__":
    main()
