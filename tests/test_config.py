"""The settings a run gets: the built-in defaults are the demo's (configs/mnist1d.yaml), a data
set or network named by an override starts its section from its own defaults, and the shipped
configs keep the values they had before the defaults became the demo's.

Expected values are the demo config file read on its own, and values written out here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from modeconn.training import cli
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import (
    DEMO_CONFIG_FILE,
    Config,
    ConfigError,
    DataSettings,
    FGESettings,
    config_origin,
    describe_origin,
    load_config,
)
from modeconn.training.core.networks import dataset_spec, load_data

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / DEMO_CONFIG_FILE
# every command that reads a config, with the arguments it cannot run without
COMMANDS = {"train": [], "curve": ["--start", "a.pt", "--end", "b.pt"], "fge": ["--from", "a.pt"], "sse": [],
            "simplex": ["--runs", "a.pt"],
            "compare": [], "pipeline": []}


def test_no_config_is_exactly_the_demo_config() -> None:
    demo = load_config(DEMO)
    assert Config().model_dump() == load_config(None).model_dump() == demo.model_dump()
    for command, required in COMMANDS.items():
        args = cli.build_parser().parse_args([command, *required])
        config = cli.config_from_args(args)
        assert config.model_dump() == demo.model_dump(), command
    # the demo's own values, spelled out: what the README's tables were made with
    assert (demo.name, demo.data.val_size, demo.data.generation) == (
        "demo", 1000, {"num_samples": 15000, "train_split": 0.2, "corr_noise_scale": 0.4})
    assert (demo.train.lr, demo.curve.epochs, demo.curve.lr, demo.fge.cycle_epochs, demo.fge.lr1, demo.fge.lr2,
            demo.fge.bn_update, demo.sse.cycle_epochs, demo.sse.lr, demo.compare.seeds, demo.compare.equal_budget_lr
            ) == (0.4, 60, 0.1, 2.0, 0.4, 0.04, True, 6.0, 0.4, 5, 0.2)
    # the Python API's settings sections default to the same values
    assert FGESettings().model_dump() == demo.fge.model_dump()
    args = cli.build_parser().parse_args(["train"])
    assert cli.run_dir_from_args(args, cli.config_from_args(args).name) == Path("runs/demo/train")


def test_an_override_on_the_defaults_changes_that_field_only() -> None:
    args = cli.build_parser().parse_args(["compare", "--budgets", "1", "2", "3", "--seeds", "3", "--set",
                                          "fge.lr1=0.2"])
    config = cli.config_from_args(args, {"compare.budgets": args.budgets, "compare.seeds": args.seeds})
    expected = load_config(DEMO).model_dump()
    expected["compare"]["seeds"], expected["fge"]["lr1"] = 3, 0.2
    assert config.model_dump() == expected


def test_another_data_set_starts_from_its_own_defaults() -> None:
    """No mnist1d generation or demo hold-out on another data set: with or without a config file."""
    plain = DataSettings(name="image_folder", root="folder")
    assert (plain.generation, plain.val_size) == ({}, None)
    from_defaults = load_config(None, {"data.name": "image_folder", "data.root": "folder"})
    assert from_defaults.data.model_dump() == plain.model_dump()
    assert from_defaults.train.model_dump() == load_config(DEMO).train.model_dump()  # the others stay the demo's
    from_file = load_config(DEMO, {"data.name": "arrays", "data.train": "tr.npz", "data.test": "te.npz"})
    assert from_file.data.model_dump() == DataSettings(name="arrays", train="tr.npz", test="te.npz").model_dump()
    # the same data set again keeps the file's section
    cifar = REPO / "configs" / "cifar10_vgg16.yaml"
    assert load_config(cifar, {"data.name": "cifar10"}).data.root == "data"
    assert load_config(cifar, {"data.name": "cifar100"}).data.model_dump() == DataSettings(name="cifar100").model_dump()
    # a field given explicitly wins over the data set's defaults
    assert load_config(None, {"data.val_size": 500}).data.generation == load_config(DEMO).data.generation
    assert load_config(None, {"data.generation": {}}).data.val_size == 1000


def test_another_network_starts_from_its_own_defaults() -> None:
    preresnet = REPO / "configs" / "cifar10_preresnet164.yaml"
    assert load_config(preresnet).model.kwargs == {"depth": 164}
    assert load_config(preresnet, {"model.name": "preresnet"}).model.kwargs == {"depth": 164}
    vgg = load_config(preresnet, {"model.name": "vgg16"}).model
    assert (vgg.name, vgg.kwargs, vgg.factory) == ("vgg16", {}, None)
    own = load_config(DEMO, {"model.factory": "tests.own_models:build", "model.kwargs": {"width": 4}}).model
    assert (own.factory, own.kwargs, own.label) == ("tests.own_models:build", {"width": 4}, "tests.own_models:build")
    back = load_config(REPO / "configs" / "digits.yaml", {"model.name": "cnn1d"}).model
    assert (back.name, back.factory) == ("cnn1d", None)
    with pytest.raises(ConfigError, match="give model.name or model.factory, not both"):
        load_config(None, {"model.name": "vgg16", "model.factory": "tests.own_models:build"})


def test_shipped_configs_keep_their_values() -> None:
    """Values that were field defaults before the defaults became the demo's, now written out."""
    standard = load_config(REPO / "configs" / "mnist1d_standard.yaml")
    assert (standard.data.generation, standard.data.val_size) == ({}, None)
    assert (standard.train.lr, standard.fge.lr1, standard.fge.lr2, standard.fge.cycle_epochs, standard.fge.bn_update,
            standard.sse.lr, standard.curve.lr, standard.curve.epochs, standard.compare.seeds
            ) == (0.1, 0.2, 0.02, 2.0, False, 0.05, 0.03, 30, 5)
    data = load_data(dataset_spec(standard.data), "cpu")  # the published MNIST-1D, 10 % held out
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3600, 400, 1000)
    for name in ("cifar10_vgg16", "cifar10_preresnet164", "cifar10_wrn28x10"):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        assert (config.compare.seeds, config.data.generation, config.data.val_size) == (3, {}, None), name
        assert config.train.save_every == config.curve.save_every == 20, name
    digits = load_config(REPO / "configs" / "digits.yaml")
    assert (digits.train.lr, digits.fge.lr1, digits.fge.bn_update, digits.sse.lr, digits.curve.lr,
            digits.compare.seeds) == (0.1, 0.2, False, 0.1, 0.02, 5)


def test_errors_of_the_defaults_say_so_and_origins_read_as_given() -> None:
    with pytest.raises(ConfigError, match=r"^invalid config \(built-in defaults\): train\.lr: "):
        load_config(None, {"train.lr": -1})
    origin = config_origin(None, {"seed": None, "device": "cpu", "train.epochs": 2})
    assert origin == {"file": None, "overrides": {"device": "cpu", "train.epochs": 2}}
    assert describe_origin(origin) == (f"the built-in defaults (the demo's, `{DEMO_CONFIG_FILE}`) with `device=cpu`, "
                                       "`train.epochs=2`")
    assert describe_origin(config_origin(Path("configs/x.yaml"))) == "`configs/x.yaml`"


@pytest.mark.slow
def test_a_bare_train_command_trains_the_demo_into_runs_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command without --config or --out: the demo's settings (one epoch) into runs/demo/train."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the in-process command takes its threads from it
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "--epochs", "1", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    state = load_checkpoint(tmp_path / "runs" / "demo" / "train" / "final.pt")
    assert state["config"] == load_config(DEMO, {"train.epochs": 1, "device": "cpu"}).model_dump()
    assert (state["dataset"]["train_size"], state["dataset"]["val_size"], state["dataset"]["test_size"]) == (
        2000, 1000, 12000)
    assert os.path.isfile(tmp_path / "runs" / "demo" / "train" / "config.yaml")
