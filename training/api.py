"""The Python API: curves, FGE / SSE / SWA, alignment, ensemble evaluation and export for any
`nn.Module` over torch data (a map-style `Dataset` or a `DataLoader` of (inputs, labels)).

Every function runs the same core as its `modeconn` command (one code path): the command loads
checkpoints, calls the core and writes files; these functions hand the core plain modules and
return plain ones. Inputs are taken as the network receives them (normalise them in the data);
the stages batch and shuffle the data themselves (settings' `batch_size`), so the loaders'
batching does not matter. The modules given are never changed: work happens on copies, on the
device of the first module's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from modeconn.contract.errors import ModeconnError
from modeconn.training.core import statistics
from modeconn.training.core.config import (
    ConfigError,
    CurveSettings,
    ExportSettings,
    FGESettings,
    SimplexSettings,
    SSESettings,
    _describe,
)
from modeconn.training.core.data import Dataset, dataset_from_torch
from modeconn.training.core.loop import StageRun
from modeconn.training.core.networks import predict_probs, weights_mismatch
from modeconn.training.core.statistics import Interval
from modeconn.training.curves.model import CurveModel
from modeconn.training.simplex.model import SimplexModel

Data = DataLoader | TorchDataset
Section = TypeVar("Section", bound=BaseModel)


class NetworkMismatchError(ModeconnError):
    """Networks that cannot be combined: different parameter names or shapes."""


# ---------------------------------------------------------------- helpers
def _section(cls: type[Section], settings: Section | None, overrides: dict[str, Any]) -> Section:
    """A settings section from `settings` (or the defaults) with keyword overrides, validated."""
    tree = {**(settings.model_dump() if settings is not None else {}), **overrides}
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, cls.__name__)) from None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _same_network(networks: Sequence[nn.Module], what: str = "networks") -> None:
    if not networks:
        raise NetworkMismatchError(f"no {what} given")
    for i, net in enumerate(networks[1:], start=1):
        if (problem := weights_mismatch(networks[0], net.state_dict())) is not None:
            raise NetworkMismatchError(f"{what} 0 and {i} differ: {problem}")


@torch.no_grad()
def _member_probs(members: Sequence[nn.Module], data: Dataset, split: str) -> torch.Tensor:
    """[K, N, C] softmax outputs of each member on `split` (eval mode, each member's mode restored)."""
    out = []
    for net in members:
        was_training = net.training
        out.append(predict_probs(net.eval(), data.to(_device(net)), split).cpu())
        net.train(was_training)
    return torch.stack(out)


# ---------------------------------------------------------------- curves
@dataclass
class CurveEvaluation:
    """Metrics at each t along the curve, the straight line and the line after alignment (rows with
    train/test error, NLL, ...), eval-curve's headline, and per path the paired bootstrap interval of
    (test error at the path's worst t) - (worse endpoint), in percentage points."""

    curve: list[dict[str, float]]
    line: list[dict[str, float]]
    aligned_line: list[dict[str, float]]
    headline: dict[str, float]
    differences: dict[str, Interval]  # "curve", "line", "aligned line"
    test_size: int

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> CurveEvaluation:
        differences = {name.removesuffix(" max - worse endpoint"): Interval(**cell["error"])
                       for name, cell in report["differences"].items()}
        return cls(report["curve"], report["line"], report["aligned_line"], report["headline"], differences,
                   report["test_size"])


@dataclass
class Curve:
    """A fitted curve φ(t), t in [0, 1], between two networks; `model` holds its control points."""

    model: CurveModel
    settings: CurveSettings
    data: Dataset  # the training data (BN statistics are recomputed over it) and validation split
    history: list[dict[str, Any]]  # per-epoch training rows
    train: Data
    val: Data | None = None

    def network(self, t: float) -> nn.Module:
        """The plain network at t, its BN statistics recomputed over the training data (eval mode)."""
        from modeconn.training.curves.evaluate import point_network

        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"t must lie in [0, 1], got {t}")
        return point_network(self.model, t, self.data)

    def evaluate(self, test: Data, points: int | None = None) -> CurveEvaluation:
        """Metrics at `points` evenly spaced t (default: settings.eval_points) along the curve and the
        lines, BN recomputed at each: what `modeconn eval-curve` reports."""
        from modeconn.training.curves.evaluate import curve_report

        data = dataset_from_torch(self.train, test, self.val, class_names=self.data.class_names).to(self.data.x_train.device)
        report = curve_report(self.model, data, points or self.settings.eval_points, self.settings.weight_decay)
        return CurveEvaluation.from_report(report)


def fit_curve(start: nn.Module, end: nn.Module, train: Data, *, settings: CurveSettings | None = None,
              val: Data | None = None, seed: int = 0, **overrides: Any) -> Curve:
    """Fit a Bezier or PolyChain curve (`settings.curve`) between two networks of one architecture
    over the training data. Keyword overrides set CurveSettings fields (epochs=..., lr=...)."""
    from modeconn.training.curves.fit import curve_model, train_curve

    _same_network([start, end], "curve ends")
    settings = _section(CurveSettings, settings, overrides)
    data = dataset_from_torch(train, None, val).to(_device(start))
    torch.manual_seed(seed)
    curve = curve_model(copy.deepcopy(start), start.state_dict(), end.state_dict(), settings)
    history = train_curve(curve, data, settings, StageRun(seed=seed, save_every=settings.save_every))
    return Curve(curve.eval(), settings, data, history, train, val)


# ---------------------------------------------------------------- simplexes
@dataclass
class Simplex:
    """A fitted simplex (or the paper's mode-connecting complex) of networks; `model` holds its
    vertices, the networks given first. A point is given by barycentric weights w over all the
    vertices (w >= 0, sum 1): θ(w) = Σ w_i θ_i."""

    model: SimplexModel
    settings: SimplexSettings
    data: Dataset  # the training data (BN statistics are recomputed over it) and validation split
    history: list[dict[str, Any]]  # per-epoch training rows of each trained vertex ("vertex": its number)
    train: Data
    val: Data | None = None

    def network(self, w: Sequence[float] | torch.Tensor) -> nn.Module:
        """The plain network at θ(w), its BN statistics recomputed over the training data (eval mode)."""
        from modeconn.training.simplex.evaluate import point_network

        weights = torch.as_tensor(w, dtype=torch.float64).flatten()
        if len(weights) != self.model.num_vertices or bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-6:
            raise ConfigError(f"w must be {self.model.num_vertices} non-negative weights summing to 1, got {weights.tolist()}")
        return point_network(self.model, weights, self.data)

    def sample(self, count: int, *, seed: int = 0) -> list[nn.Module]:
        """`count` networks at points drawn as training draws them (uniform on a simplex of the
        complex), BN recomputed for each: an ensemble's members."""
        from modeconn.training.simplex.evaluate import point_network
        from modeconn.training.simplex.model import sample_weights

        generator = torch.Generator().manual_seed(seed)
        return [point_network(self.model, sample_weights(self.model.num_vertices, self.model.simplexes, generator),
                              self.data) for _ in range(count)]

    def evaluate(self, test: Data) -> dict[str, Any]:
        """What `modeconn simplex` reports: rows (train loss, train/val/test error and NLL) at every
        vertex, every simplex's centre and `settings.eval_points` sampled points, their summary per
        kind, the paired bootstrap interval of (sampled points - vertices) in mean test error, and
        under "ensemble" `ensemble-eval`'s report of the first `settings.ensemble_size` sampled points."""
        from modeconn.training.ensembles.evaluate import ensemble_summary
        from modeconn.training.simplex.evaluate import simplex_evaluation

        data = dataset_from_torch(self.train, test, self.val, class_names=self.data.class_names).to(self.data.x_train.device)
        members: list[nn.Module] = []
        found = simplex_evaluation(self.model, data, self.settings, keep=lambda _, net, __: members.append(net))
        probs = found.pop("sample_probs")
        val_probs = _member_probs(members, data, "val") if len(data.y_val) else None
        found["ensemble"] = ensemble_summary(probs, data.y_test, val_probs, data.y_val if val_probs is not None else None)
        return found


def fit_simplex(networks: nn.Module | Sequence[nn.Module], train: Data, *, settings: SimplexSettings | None = None,
                val: Data | None = None, seed: int = 0, **overrides: Any) -> Simplex:
    """Grow a simplex of low loss (Benton et al., ICML 2021) with `networks` as its fixed vertices:
    one network gives ESPRO's simplex around it, several one simplex through them (or, with
    connecting=True, the paper's mode-connecting complex). `settings.vertices` trained vertices are
    added one at a time. Keyword overrides set SimplexSettings fields (vertices=..., epochs=...)."""
    from modeconn.training.simplex.fit import check_shape, grow_simplex
    from modeconn.training.simplex.model import vertex_matrix

    nets = _members(networks)
    settings = _section(SimplexSettings, settings, overrides)
    check_shape(len(nets), settings)
    data = dataset_from_torch(train, None, val).to(_device(nets[0]))
    torch.manual_seed(seed)
    base = copy.deepcopy(nets[0])
    vertices = vertex_matrix([n.state_dict() for n in nets], base).to(_device(nets[0]))
    simplex, history = grow_simplex(base, vertices, data, settings, StageRun(seed=seed, save_every=settings.save_every))
    return Simplex(simplex, settings, data, history, train, val)


# ---------------------------------------------------------------- FGE, SSE, SWA
def fge(model: nn.Module, train: Data, *, settings: FGESettings | None = None, seed: int = 0,
        **overrides: Any) -> list[nn.Module]:
    """Fast Geometric Ensembling from a trained network (fresh momentum): the snapshots collected in
    the middle of each cycle, BN recomputed over the training data (eval mode)."""
    from modeconn.training.ensembles.fge import fge_networks

    settings = _section(FGESettings, settings, overrides)
    data = dataset_from_torch(train, None).to(_device(model))
    torch.manual_seed(seed)  # dropout draws, as `modeconn fge` seeds them
    return fge_networks(copy.deepcopy(model), data, settings, StageRun(seed=seed))


def sse(model: nn.Module, train: Data, *, settings: SSESettings | None = None, seed: int = 0,
        **overrides: Any) -> list[nn.Module]:
    """Snapshot Ensembles from `model` (an initialisation): a snapshot at the end of each cosine cycle,
    BN recomputed over the training data (eval mode)."""
    from modeconn.training.ensembles.sse import sse_networks

    settings = _section(SSESettings, settings, overrides)
    data = dataset_from_torch(train, None).to(_device(model))
    torch.manual_seed(seed)  # dropout draws, as `modeconn sse` seeds them
    return sse_networks(copy.deepcopy(model), data, settings, StageRun(seed=seed))


def swa(snapshots: Sequence[nn.Module], train: Data) -> nn.Module:
    """Stochastic Weight Averaging: the networks' parameters averaged, BN recomputed over the training
    data (eval mode)."""
    from modeconn.training.ensembles.swa import swa_average

    _same_network(list(snapshots), "snapshots")
    return swa_average(snapshots, dataset_from_torch(train, None).to(_device(snapshots[0])))


def align(a: nn.Module, b: nn.Module, example_input: torch.Tensor, *, seed: int = 0) -> nn.Module:
    """A copy of `b` with its hidden units permuted to match `a` (weight matching); it computes the
    same function as `b`. The network is traced on `example_input` (a batch) to find the units."""
    from modeconn.training.curves.align import align_weights

    _same_network([a, b], "networks")
    model = copy.deepcopy(a).cpu().eval()
    aligned, _ = align_weights(model, a.state_dict(), b.state_dict(), example_input.detach().cpu(), seed=seed)
    out = copy.deepcopy(b)
    out.load_state_dict(aligned)
    return out


# ---------------------------------------------------------------- ensembles
@dataclass
class EnsembleEvaluation:
    """Test metrics of an ensemble (the mean of its members' softmax outputs): error (%), NLL (nats),
    ECE (15 bins) and Brier; each member's; with a validation set, the temperature fitted there and
    the calibrated test metrics. `report` is what `modeconn ensemble-eval` reports."""

    error: float
    nll: float
    ece: float
    brier: float
    members: list[dict[str, Any]]
    temperature: float | None
    calibrated: dict[str, float] | None
    probs: torch.Tensor  # [N, C] the ensemble's test probabilities (float64)
    labels: torch.Tensor
    report: dict[str, Any]

    def compare(self, other: EnsembleEvaluation, *, resamples: int = statistics.RESAMPLES,
                seed: int = statistics.SEED) -> dict[str, Interval]:
        """Paired bootstrap 95 % intervals of (this - other) over the same test examples: "error"
        (percentage points), "nll", "brier"."""
        if not torch.equal(self.labels, other.labels):
            raise ConfigError("compare needs evaluations on the same test examples (the labels differ)")
        return statistics.compare_probs(self.probs, other.probs, self.labels, resamples, seed)


def _members(members: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    found = [members] if isinstance(members, nn.Module) else list(members)
    _same_network(found, "members")
    return found


def evaluate_ensemble(members: nn.Module | Sequence[nn.Module], test: Data, *,
                      val: Data | None = None) -> EnsembleEvaluation:
    """Evaluate the ensemble of `members` (one network is an ensemble of one) on `test`; with `val`,
    fit the temperature there and report calibrated test metrics too."""
    from modeconn.training.ensembles.evaluate import ensemble_probs, ensemble_summary

    nets = _members(members)
    data = dataset_from_torch(test, test, val)  # the stage reads the test split (train is unused here)
    probs = _member_probs(nets, data, "test")
    val_probs = _member_probs(nets, data, "val") if val is not None else None
    report = ensemble_summary(probs, data.y_test, val_probs, data.y_val if val is not None else None)
    calibration = (report["calibration"] or {}).get("ensemble")
    ensemble = report["ensemble"]
    return EnsembleEvaluation(
        error=ensemble["test_error"], nll=ensemble["test_nll"], ece=ensemble["test_ece"],
        brier=ensemble["test_brier"], members=report["member_metrics"],
        temperature=calibration["temperature"] if calibration else None,
        calibrated=calibration["calibrated_metrics"] if calibration else None,
        probs=ensemble_probs(probs), labels=data.y_test, report=report)


def fit_temperature(members: nn.Module | Sequence[nn.Module], val: Data) -> float:
    """The temperature T minimising the validation NLL of softmax(log p / T), p the ensemble's
    probabilities (for one network, softmax(logits / T))."""
    from modeconn.training.ensembles.calibration import fit_temperature as fit
    from modeconn.training.ensembles.evaluate import ensemble_probs

    data = dataset_from_torch(val, val)
    return fit(ensemble_probs(_member_probs(_members(members), data, "test")), data.y_test)


# ---------------------------------------------------------------- export
def _architecture(net: nn.Module) -> dict[str, Any]:
    """The manifest's record of a user's network: its class's import path (what built it)."""
    cls = type(net)
    return {"factory": f"{cls.__module__}:{cls.__qualname__}", "kwargs": {}}


def export(out_dir: str | Path | None, *, example_input: torch.Tensor, test: Data,
           members: Sequence[nn.Module] | None = None, curve: Curve | None = None, swa: nn.Module | None = None,
           val: Data | None = None, train: Data | None = None, class_names: list[str] | None = None,
           name: str | None = None, settings: ExportSettings | None = None, **overrides: Any) -> Path | str:
    """Write the artifact the service reads into the folder `out_dir` (returned), or with `out_dir`
    None into the BentoML model store as `name` (the tag returned, for `bentoml serve`), by the
    exporter of `modeconn export`: the member graphs and the ensemble graph, the curve graph with t
    as an input, the SWA graph, each checked against PyTorch on `example_input` by onnxruntime.
    Without `members`, the curve's two ends are the members. Metrics are measured on `test`,
    temperatures fitted on `val` (default: the curve's validation data). `train` (default: the
    curve's, else `test`) gives the input range the manifest records. Keyword overrides set
    ExportSettings fields (bn_grid_points=..., parity_atol=...)."""
    from modeconn.training.export import ExportJob, Normalize, Sources, write_artifact

    settings = _section(ExportSettings, settings, overrides)
    if members is None and curve is not None:
        members = [curve.network(0.0), curve.network(1.0)]
    if not members:
        raise ConfigError("export needs members (or a curve, whose two ends are then the members)")
    nets = [copy.deepcopy(m).cpu().eval() for m in members]
    _same_network([*nets, *([swa] if swa is not None else [])], "exported networks")
    if curve is not None:
        val = val if val is not None else curve.val
        train = curve.train
    data = dataset_from_torch(train if train is not None else test, test, val, class_names=class_names)
    fields = {"architecture": _architecture(nets[0]), "dataset": data.describe()}
    curve_model = curve_state = None
    if curve is not None:
        curve_model = copy.deepcopy(curve.model).cpu().eval()
        curve_state = {**fields, "curve": {**curve_model.settings(), "fix_start": curve.settings.fix_start,
                                           "fix_end": curve.settings.fix_end,
                                           "weight_decay": curve.settings.weight_decay}}
    swa_net = copy.deepcopy(swa).cpu().eval() if swa is not None else None
    job = ExportJob(
        name=name or "modeconn-custom", sources=Sources(), nets=nets,
        states=[{**fields, "kind": "network"} for _ in nets], curve=curve_model, curve_state=curve_state, data=data,
        normalize=Normalize(data.mean, data.std, 1 + len(data.input_shape)),
        x_check=example_input.detach().cpu().float().contiguous(), grid_points=settings.bn_grid_points,
        atol=settings.parity_atol, max_interpolation_pp=settings.max_bn_interpolation_pp,
        swa_net=swa_net, swa_state={**fields, "kind": "swa"} if swa_net is not None else None)
    where, _ = write_artifact(job, None if out_dir is None else Path(out_dir), [])
    return Path(where["folder"]) if out_dir is not None else where["tag"]
