"""Run settings: one pydantic-validated YAML config per experiment, with CLI overrides.

The built-in defaults are the demo's settings (configs/mnist1d.yaml, which explains each
choice): a command without --config runs the demo, and a config file gives only what differs.
The data section's defaults follow `data.name`: mnist1d's are the demo's variant (its
generation parameters and validation size); any other data set starts from its own (no
generation, its own validation hold-out), so `--set data.name=...` needs nothing else.

An unknown key or a bad value is an error that names the field (`train.lr: ...`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from modeconn.contract.errors import ModeconnError
from modeconn.training.core.model_source import import_path_problem, name_problem


class ConfigError(ModeconnError):
    """A config file or override that does not validate; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# the demo's MNIST-1D variant (docs/demo-regime.md): the defaults of data.name mnist1d. An explicit
# `generation: {}` is the published data set, `val_size: null` its default hold-out (10 %)
DEMO_MNIST1D: dict[str, Any] = {
    "val_size": 1000,  # of the 3000 generated training signals: 2000 train / 1000 validation
    "generation": {"num_samples": 15000, "train_split": 0.2, "corr_noise_scale": 0.4},
}
# where the built-in defaults are written out, with the reasons for each value
DEMO_CONFIG_FILE = "configs/mnist1d.yaml"


class DataSettings(_Strict):
    name: str = "mnist1d"
    root: str | None = None  # folder holding the CIFAR archives; a cache folder for MNIST-1D
    # validation hold-out of the training set, for choosing settings (never the test split);
    # None: the data set's default (MNIST-1D 10 % of its training part, CIFAR 5000 images).
    # Not given for mnist1d: the demo's 1000 (DEMO_MNIST1D)
    val_size: int | None = Field(None, ge=0)
    split_seed: int = 0
    # MNIST-1D only: the mnist1d package's generation parameters (get_dataset_args fields) that
    # differ from the package's; not given for mnist1d: the demo's variant (DEMO_MNIST1D)
    generation: dict[str, Any] = Field(default_factory=dict)
    # arrays only: the train and test parts, each an .npz (arrays x, y) or a folder with
    # x.npy and y.npy; a relative path is taken from `root` when it is set
    train: str | None = None
    test: str | None = None
    # image_folder only: every image resized to [H, W] (Pillow bilinear; None: all must have
    # one size) and read as 1 (grayscale) or 3 (RGB) channels (None: as the first image is)
    resize: list[int] | None = Field(None, min_length=2, max_length=2)
    channels: Literal[1, 3] | None = None
    # normalisation per channel (or one value); None: computed on the training split
    mean: list[float] | None = None
    std: list[float] | None = None
    # True: every split a tensor on the device; False: streamed through a DataLoader;
    # None: the source's default (image folders and very large .npy files stream, the rest held)
    in_memory: bool | None = None
    # DataLoader worker processes of streamed splits; None: half the cores, 1 to 4
    num_workers: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_data_set(cls, tree: Any) -> Any:
        # the defaults follow the data set named: the demo's variant for mnist1d (the default name);
        # another data set keeps the field defaults, so naming it leaves no mnist1d field to unset
        if isinstance(tree, dict) and tree.get("name", cls.model_fields["name"].default) == "mnist1d":
            return {**copy.deepcopy(DEMO_MNIST1D), **tree}
        return tree

    @model_validator(mode="after")
    def _mean_with_std(self) -> DataSettings:
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both or neither")
        if self.resize is not None and min(self.resize) < 1:
            raise ValueError(f"resize must be [H, W] of positive ints, got {self.resize}")
        return self


class ModelSettings(_Strict):
    """The network, one of: `name`, a registered architecture (`cnn1d`, `vgg16`, ...) or
    `torchvision:NAME` / `timm:NAME` where that package is installed; or `factory`, any callable
    named by import path ("my_package.nets:build", the current directory importable), given
    `num_classes` when it takes it and `kwargs` (training/core/model_source.py). Checkpoints
    record it as their `architecture`, so later commands rebuild the network without a config."""

    name: str = "cnn1d"
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_form(cls, name: str) -> str:
        if (problem := name_problem(name)) is not None:
            raise ValueError(problem)
        return name

    @field_validator("factory")
    @classmethod
    def _import_path(cls, factory: str | None) -> str | None:
        if factory is not None and (problem := import_path_problem(factory)) is not None:
            raise ValueError(problem)
        return factory

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if self.factory is not None and "name" in self.model_fields_set:
            raise ValueError(f"give model.name or model.factory, not both (name {self.name!r}, "
                             f"factory {self.factory!r})")
        return self

    @property
    def label(self) -> str:
        """The short name reports show: the registry/package name or the factory's import path."""
        return self.factory or self.name

    @model_serializer(mode="wrap")
    def _as_recorded(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the architecture record: {name, kwargs} (as before factories existed) or {factory, kwargs}
        tree = handler(self)
        tree.pop("name" if self.factory is not None else "factory")
        return tree


class TrainSettings(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    save_every: int = Field(10, ge=1, description="checkpoint every N epochs (and at the end)")
    # networks that differ only by seed (compare's Ind runs, the pipeline's two endpoints) in one
    # batched pass on one device (training/batched.py); false: one after another; auto: batched
    # on a GPU only (on the CPU a batched step of the demo network costs more than the separate
    # steps: docs/scale.md). Not a result setting: a folder trained either way is reused either way
    batched: Literal["auto"] | bool = "auto"


class CurveSettings(_Strict):
    curve: Literal["bezier", "polychain"] = "bezier"
    num_bends: int = Field(3, ge=3)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    init: Literal["linear", "random"] = "linear"
    fix_start: bool = True
    fix_end: bool = True
    save_every: int = Field(10, ge=1)
    eval_points: int = Field(61, ge=2)


class SimplexSettings(_Strict):
    """`modeconn simplex` (Benton et al., ICML 2021): trained vertices added one at a time to the
    networks given (fixed vertices), each new one trained with the earlier ones frozen."""

    vertices: int = Field(2, ge=1, description="trained vertices added to the networks given")
    # with two or more networks: the paper's mode-connecting complex (one simplex per network, each
    # with every trained vertex) instead of one simplex through all of them
    connecting: bool = False
    epochs: int = Field(10, ge=1, description="epochs per trained vertex")
    # each trained vertex's own epochs, in order (None: `epochs` each); compare splits a budget so
    vertex_epochs: list[int] | None = None
    batch_size: int = Field(128, ge=1)
    # cosine-annealed over each vertex's epochs, as the reference code (whose 0.01 kept the demo's
    # simplexes nearly one network); chosen on validation with volume_weight (configs/mnist1d.yaml)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    # chosen on validation for the demo (configs/mnist1d.yaml has the sweep's numbers)
    volume_weight: float = Field(1e-2, ge=0, description="λ of the regulariser −λ log(V² + ε)")
    samples_per_step: int = Field(1, ge=1, description="points drawn per step, their losses averaged")
    save_every: int = Field(5, ge=1)
    eval_points: int = Field(10, ge=1, description="sampled points evaluated (BN recomputed at each)")
    ensemble_size: int = Field(8, ge=1, description="sampled points ensembled (the first of those drawn)")

    @model_validator(mode="after")
    def _one_length_per_vertex(self) -> SimplexSettings:
        if self.vertex_epochs is not None and (len(self.vertex_epochs) != self.vertices
                                               or min(self.vertex_epochs) < 1):
            raise ValueError(f"vertex_epochs must give {self.vertices} whole numbers of epochs of at least 1 "
                             f"(one per trained vertex), got {self.vertex_epochs}")
        return self

    def epochs_of(self, stage: int) -> int:
        """Epochs of trained vertex `stage` (1, 2, ...)."""
        return self.vertex_epochs[stage - 1] if self.vertex_epochs is not None else self.epochs


class FGESettings(_Strict):
    cycle_epochs: float = Field(2.0, gt=0)
    lr1: float = Field(0.4, gt=0)
    lr2: float = Field(0.04, gt=0)
    epochs: float = Field(6.0, gt=0, description="FGE budget in epochs")
    start_fraction: float = Field(0.8, gt=0, le=1, description="start from this point of a train run")
    bn_update: bool = True
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)

    @model_validator(mode="after")
    def _lr2_below_lr1(self) -> FGESettings:
        if self.lr2 > self.lr1:
            raise ValueError(f"lr2 ({self.lr2}) must not exceed lr1 ({self.lr1}): the cycle descends to lr2")
        return self


class SSESettings(_Strict):
    cycle_epochs: float = Field(6.0, gt=0)
    epochs: int = Field(30, ge=1, description="SSE budget in epochs")
    lr: float = Field(0.4, gt=0)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)


class ExportSettings(_Strict):
    name: str = "modeconn-mnist1d"
    bn_grid_points: int = Field(61, ge=2)
    parity_atol: float = Field(1e-5, gt=0)
    # refuse a curve graph whose BN interpolation between grid points moves the test error more
    max_bn_interpolation_pp: float = Field(0.2, ge=0)


class CompareSettings(_Strict):
    budgets: list[int] = Field(default_factory=lambda: [1, 2, 3])
    seeds: int = Field(5, ge=1)
    # the equal-budget baseline: at kB also m independent networks of kB/m epochs each
    equal_budget_members: list[int] = Field(default_factory=lambda: [2, 3])
    # their train.lr (None: train.lr): shorter networks may prefer another lr (the demo's, chosen
    # on validation for the pair of 1B, is the default; other configs give theirs or null)
    equal_budget_lr: float | None = Field(0.2, gt=0)
    # SWAG at kB: networks drawn from the Gaussian of FGE's snapshots at kB (0: no SWAG row),
    # at the covariance scale of these the validation split prefers
    swag_samples: int = Field(8, ge=0)
    swag_scales: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0])
    # out-of-distribution sets each method's AUROC is reported for (made with the config's seed):
    # "auto" = the built-in ones for the data set, "none", or paths of inputs (data.ood_names)
    ood: list[str] = Field(default_factory=lambda: ["auto"])
    # a Simplex row (ESPRO grown from the first Ind network, its vertices trained for the rest of
    # the budget) from 2B on; off by default: it trains (k - 1) budgets more per seed and budget
    simplex: bool = False

    @model_validator(mode="after")
    def _members_at_least_two(self) -> CompareSettings:
        if any(m < 2 for m in self.equal_budget_members):
            raise ValueError(f"equal_budget_members must be 2 or more networks each, got {self.equal_budget_members}")
        return self


class DistributedSettings(_Strict):
    """Used only under torchrun (several processes); one process ignores it."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL on CUDA, gloo on CPUs
    sync_batchnorm: bool = False  # BN over the global batch in training (default: each rank's own)


class StepSettings(_Strict):
    """How every stage's training step runs (train, curve, FGE, SSE); fp32 and off by default
    (why: README, Faster steps; benchmarks/results/training_step_options-2026-12-02.md)."""

    # autocast for the forward pass; the loss, BN re-estimation and evaluation stay fp32;
    # fp16 adds a GradScaler. CPU: bf16 (and fp16 where the installed torch autocasts it)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC memory layout for image models (4-D inputs only)
    compile: bool = False  # torch.compile the step's model (needs a C++ compiler for inductor)


class Config(_Strict):
    """Every setting of a run; each field's default is the demo's (configs/mnist1d.yaml)."""

    name: str = "demo"  # reports show it; default run folders are runs/NAME/...
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    curve: CurveSettings = Field(default_factory=CurveSettings)
    simplex: SimplexSettings = Field(default_factory=SimplexSettings)
    fge: FGESettings = Field(default_factory=FGESettings)
    sse: SSESettings = Field(default_factory=SSESettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    compare: CompareSettings = Field(default_factory=CompareSettings)
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    step: StepSettings = Field(default_factory=StepSettings)
    # per-epoch metrics of every stage also as TensorBoard events in RUN/tensorboard (rank 0)
    tensorboard: bool = False


def _describe(err: ValidationError, source: str) -> str:
    """One line for one problem (the usual case), else a line per field."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    if len(problems) == 1:
        return f"invalid config ({source}): {problems[0]}"
    return "\n".join([f"invalid config ({source}):", *(f"  {p}" for p in problems)])


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _identity(section: str, fields: dict[str, Any]) -> tuple[str, Any]:
    """Which data set or network a data / model section (a config file's fields) describes."""
    if section == "model" and fields.get("factory") is not None:
        return "factory", fields["factory"]
    defaults = {"data": DataSettings, "model": ModelSettings}[section].model_fields["name"].default
    return "name", fields.get("name", defaults)


def _restart_changed_sections(tree: dict[str, Any], overrides: dict[str, Any]) -> None:
    """An override naming another data set (data.name) or network (model.name, model.factory) than
    the file's starts that section over from the new choice's defaults: the file's fields of the
    old choice (mnist1d's generation, a network's kwargs, a folder) do not carry over to it."""
    for section in ("data", "model"):
        old = tree.get(section)
        named = [(k, overrides[f"{section}.{k}"]) for k in ("factory", "name") if f"{section}.{k}" in overrides]
        if isinstance(old, dict) and named and named[0] != _identity(section, old):
            tree[section] = {}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (None: the built-in defaults, the demo's) and apply dotted overrides
    like {"train.lr": 0.05}; an override of None is not given. An override of data.name,
    model.name or model.factory that names another data set or network than the file's starts
    that section over (_restart_changed_sections)."""
    tree: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    given = {dotted: value for dotted, value in (overrides or {}).items() if value is not None}
    _restart_changed_sections(tree, given)
    for dotted, value in given.items():
        _set_path(tree, dotted, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def config_origin(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a run's settings came from, for its reports: the config file (None: the built-in
    defaults, the demo's) and the overrides given on top of it (flags and --set)."""
    return {"file": None if path is None else str(path),
            "overrides": {k: v for k, v in (overrides or {}).items() if v is not None}}


def describe_origin(origin: dict[str, Any]) -> str:
    """One phrase for a report: `configs/x.yaml` or the built-in defaults, and the overrides."""
    where = f"`{origin['file']}`" if origin.get("file") else f"the built-in defaults (the demo's, `{DEMO_CONFIG_FILE}`)"
    given = ", ".join(f"`{k}={v}`" for k, v in (origin.get("overrides") or {}).items())
    return where + (f" with {given}" if given else "")


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """`--set train.lr=0.05` pairs; values are read as YAML scalars (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example train.lr=0.05")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out
