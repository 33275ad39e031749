"""Permutation alignment (training/curves/permutations.py, training/curves/align.py): the derived
groups preserve the function for every registry architecture, a wrong grouping is caught, weight
matching recovers a known permutation and never lowers its objective, bad input is a clear error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from modeconn.models import build_model
from modeconn.training.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_checkpoint,
)
from modeconn.training.core.config import ConfigError
from modeconn.training.curves.align import align_states, apply_permutation, inverse, weight_matching
from modeconn.training.curves.permutations import PermutationSpec, PermutationSpecError, derive_spec

CIFAR = (3, 32, 32)
# Small members of every registry family (vgg16/vgg16bn have no size knob: full size).
ARCHITECTURES = [
    ("cnn1d", {"width": 4}, (40,)),
    ("cnn1d", {"width": 4, "batchnorm": False}, (40,)),
    ("vgg16", {}, CIFAR),
    ("vgg16bn", {}, CIFAR),
    ("preresnet", {"depth": 8}, CIFAR),
    ("preresnet", {"depth": 47}, CIFAR),  # bottleneck blocks, as in PreResNet-164
    ("wideresnet", {"depth": 10, "widen_factor": 1}, CIFAR),
]
MATCHED = {"cnn1d", "preresnet", "wideresnet"}  # weight matching run too (vgg: ~5 s a sweep on 2 busy cores)


def _network(name: str, kwargs: dict, seed: int) -> nn.Module:
    """A random network with random BN statistics and affine parameters (so BN is not the identity)."""
    torch.manual_seed(seed)
    model = build_model(name, 10, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


@torch.no_grad()
def _max_prob_change(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    other = copy.deepcopy(model)
    other.load_state_dict(weights)
    return float((torch.softmax(model(x), 1) - torch.softmax(other.eval()(x), 1)).abs().max())


def _inputs(shape: tuple[int, ...], demo_data) -> torch.Tensor:  # noqa: ANN001
    if shape == (40,):
        return demo_data.x_test  # the demo's test split (12,000 signals)
    return torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "kwargs", "shape"), ARCHITECTURES, ids=lambda v: str(v))
def test_permuted_network_computes_the_same_function(name, kwargs, shape, demo_data) -> None:  # noqa: ANN001
    model = _network(name, kwargs, seed=0)
    spec = derive_spec(model, torch.zeros(2, *shape))
    state = model.state_dict()
    # every group permutes something, and the classifier's outputs are never permuted
    assert spec.sizes and all(spec.axes[g] for g in spec.sizes)
    last = [k for k, v in state.items() if v.dim() == 2][-1]  # the final Linear's weight
    assert all(not (a.key == last and a.dim == 0) for axes in spec.axes.values() for a in axes)
    x = _inputs(shape, demo_data)
    perms = _random_perms(spec, seed=1)
    permuted = apply_permutation(spec, state, perms)
    moved = sum(not torch.equal(permuted[k], state[k]) for k in state)
    assert moved >= len(spec.sizes)  # it really permuted
    assert _max_prob_change(model, permuted, x) <= 1e-5
    if name in MATCHED:  # weight matching B onto A: B's function, a higher objective
        a = _network(name, kwargs, seed=2).state_dict()
        learnable = {n for n, _ in model.named_parameters()}
        matching = weight_matching(spec, a, state, learnable)
        aligned = apply_permutation(spec, state, matching.perms)
        assert _max_prob_change(model, aligned, x) <= 1e-5
        independent = sum(float((a[k].double() * aligned[k].double()).sum()) for k in learnable)
        before = sum(float((a[k].double() * state[k].double()).sum()) for k in learnable)
        assert independent == pytest.approx(matching.objective_after, rel=1e-9)
        assert before == pytest.approx(matching.objective_before, rel=1e-9)
        assert matching.objective_after >= matching.objective_before


def _split_residual_union(spec: PermutationSpec) -> PermutationSpec:
    """The spec with one residual union dropped: in a group fed by two layers' outputs (a block's
    last conv and the shortcut), the second layer's output axis gets a group of its own."""
    for group, axes in spec.axes.items():
        producers = [a for a in axes if a.dim == 0 and a.key.endswith(".weight") and "bn" not in a.key]
        if len(producers) >= 2:
            wrong = PermutationSpec(dict(spec.sizes), {g: list(v) for g, v in spec.axes.items()})
            moved = [a for a in axes if a.key.rsplit(".", 1)[0] == producers[1].key.rsplit(".", 1)[0] and a.dim == 0]
            wrong.axes[group] = [a for a in axes if a not in moved]
            wrong.sizes["split"], wrong.axes["split"] = spec.sizes[group], moved
            return wrong
    raise AssertionError("no residual union in this spec")


def test_a_wrong_spec_fails_the_function_check() -> None:
    model = _network("preresnet", {"depth": 8}, seed=0)
    spec = derive_spec(model, torch.zeros(2, *CIFAR))
    x = torch.randn(16, *CIFAR, generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    wrong = _split_residual_union(spec)
    perms = _random_perms(wrong, seed=1)
    assert _max_prob_change(model, apply_permutation(wrong, state, perms), x) > 1e-2
    right = {g: p for g, p in perms.items() if g != "split"}
    assert _max_prob_change(model, apply_permutation(spec, state, right), x) <= 1e-5


def test_preresnet_groups_tie_residual_streams_and_pre_activation_bn() -> None:
    model = build_model("preresnet", 10, depth=8)
    spec = derive_spec(model, torch.zeros(2, *CIFAR))
    by_key = spec.key_axes()
    # the stage-2 stream: shortcut conv out, block conv2 out, the next stage's BN before its conv1
    (stream,) = {g for g, a in by_key["layer2.0.downsample.0.weight"] if a.dim == 0}
    assert {(a.key, a.dim) for a in spec.axes[stream]} >= {
        ("layer2.0.conv2.weight", 0), ("layer3.0.bn1.running_var", 0), ("layer3.0.conv1.weight", 1),
        ("layer3.0.downsample.0.weight", 1)}
    assert "fc.weight" not in {a.key for a in spec.axes[stream]}
    # the last stream reaches the classifier's input, never its output
    assert ("fc.weight", 1) in {(a.key, a.dim) for axes in spec.axes.values() for a in axes}
    assert "conv1" in spec.sizes and spec.sizes["conv1"] == 16  # the stem starts the stage-1 stream


def test_flatten_expands_a_channel_to_a_block() -> None:
    spec = derive_spec(build_model("cnn1d", 10, width=4), torch.zeros(2, 40))
    axes = {(a.key, a.dim): a.block for g in spec.axes for a in spec.axes[g]}
    assert axes[("classifier.1.weight", 1)] == 10  # 8 channels x 10 positions after two poolings


def test_weight_matching_recovers_a_known_permutation() -> None:
    model = _network("preresnet", {"depth": 8}, seed=0)
    spec = derive_spec(model, torch.zeros(2, *CIFAR))
    state = model.state_dict()
    pi = _random_perms(spec, seed=3)
    shuffled = apply_permutation(spec, state, pi)
    matching = weight_matching(spec, state, shuffled, {n for n, _ in model.named_parameters()})
    for group, perm in pi.items():  # independent: undoing π is argsort(π)
        assert torch.equal(matching.perms[group], torch.argsort(perm))
    recovered = apply_permutation(spec, shuffled, matching.perms)
    assert all(torch.equal(recovered[k], state[k]) for k in state)
    back = apply_permutation(spec, recovered, inverse(matching.perms))
    assert all(torch.equal(back[k], shuffled[k]) for k in state)


def _checkpoint(name: str, kwargs: dict, seed: int, shape: tuple[int, ...]) -> dict:
    model = _network(name, kwargs, seed)
    return model_checkpoint(model, {"name": name, "kwargs": kwargs},
                            {"name": "mnist1d", "num_classes": 10, "input_shape": list(shape)}, kind="train")


def test_bad_input_is_a_clear_error() -> None:
    a = _checkpoint("cnn1d", {"width": 4}, 0, (40,))
    with pytest.raises(CheckpointError, match="differ in architecture"):
        align_states(a, _checkpoint("cnn1d", {"width": 8}, 1, (40,)), "a.pt", "b.pt")
    with pytest.raises(CheckpointError, match="differ in architecture"):
        align_states(a, _checkpoint("preresnet", {"depth": 8}, 1, CIFAR), "a.pt", "b.pt")
    missing = _checkpoint("cnn1d", {"width": 4}, 1, (40,))
    del missing["model"]["features.3.0.weight"]
    with pytest.raises(CheckpointError, match=r"b\.pt: weights do not fit .*missing key.*features\.3\.0\.weight"):
        align_states(a, missing, "a.pt", "b.pt")


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.fc = nn.Linear(8 * 38, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(torch.flatten(torch.cat([h, h.flip(1)], 1), 1))


def test_an_op_the_walk_does_not_know_is_refused_by_name() -> None:
    with pytest.raises(PermutationSpecError, match=r"node 'flip'"):
        derive_spec(_Concat(), torch.zeros(2, 1, 40))


def test_align_command_on_the_demo_pair(trained_pair, demo_data, tmp_path: Path) -> None:  # noqa: ANN001
    from modeconn.training.cli import main
    from modeconn.training.core.networks import load_network

    start, end = (Path(r["checkpoint"]) for r in trained_pair)
    out = tmp_path / "aligned.pt"
    assert main(["align", "--start", str(start), "--end", str(end), "--out", str(out)]) == 0
    aligned, state = load_network(out)
    original, b_state = load_network(end)
    assert _max_prob_change(original, aligned.state_dict(), demo_data.x_test) <= 1e-5
    record = state["alignment"]
    assert record["objective_after"] >= record["objective_before"]
    assert state["kind"] == "aligned" and "optimizer" not in state and state["metrics"] == b_state["metrics"]
    a_weights = load_checkpoint(start)["model"]
    learnable = {n for n, _ in aligned.named_parameters()}
    after = sum(float((a_weights[k].double() * aligned.state_dict()[k].double()).sum()) for k in learnable)
    assert after == pytest.approx(record["objective_after"], rel=1e-9)
    assert main(["align", "--start", str(start), "--end", str(end), "--out", str(out)]) == 0  # replaces its own file
    user_file = tmp_path / "notes.pt"
    user_file.write_bytes(b"mine")
    assert main(["align", "--start", str(start), "--end", str(end), "--out", str(user_file)]) == 2
    assert user_file.read_bytes() == b"mine"


def test_curve_align_ends_at_the_aligned_network(trained_pair, demo_config, tmp_path: Path) -> None:  # noqa: ANN001
    from modeconn.training.curves.evaluate import lines
    from modeconn.training.curves.fit import fit_curve, load_curve

    start, end = (Path(r["checkpoint"]) for r in trained_pair)
    config = demo_config.model_copy(update={"device": "cpu"})
    config.curve.epochs = 1
    run = tmp_path / "curve"
    fit_curve(config, start, end, run, align=True)
    aligned = load_checkpoint(run / "aligned-end.pt")
    curve, state = load_curve(run)
    ends = curve.control_points()
    names = curve.names
    assert torch.equal(ends[-1], torch.cat([aligned["model"][n].reshape(-1).float() for n in names]))
    unaligned, aligned_line, record = lines(curve, state)
    b = load_checkpoint(end)["model"]
    assert torch.equal(unaligned.control_points()[-1], torch.cat([b[n].reshape(-1).float() for n in names]))
    assert torch.equal(aligned_line.control_points()[-1], ends[-1])
    assert record["objective_after"] >= record["objective_before"] and "permutations" not in record
    with pytest.raises(ConfigError, match="fitted with --align"):  # resuming must keep the same end
        fit_curve(config, start, end, run, resume=True, align=False)


def test_eval_curve_reports_the_line_after_alignment(demo_curve) -> None:  # noqa: ANN001
    import json

    ev = demo_curve["eval"]
    report = json.loads(Path(ev["json"]).read_text())
    line, aligned = report["line"], report["aligned_line"]
    assert len(aligned) == len(line) == report["points"]
    # both lines start at w0 and end at functions equal up to rounding (B and B permuted), BN recomputed
    assert aligned[0]["test_error"] == line[0]["test_error"]
    assert aligned[-1]["test_error"] == pytest.approx(line[-1]["test_error"], abs=0.02)
    assert ev["aligned_line_max_test_error"] == max(r["test_error"] for r in aligned)
    assert ev["aligned_line_max_test_error"] < ev["line_max_test_error"]  # the barrier shrinks
    assert "aligned line max - worse endpoint" in ev["differences"]
    alignment = report["settings"]["alignment"]
    assert alignment["objective_after"] >= alignment["objective_before"] and "permutations" not in alignment
    with open(ev["csv"]) as f:
        header = f.readline().strip().split(",")
    assert "aligned_line_test_error" in header and "line_test_error" in header
