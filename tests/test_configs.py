"""Every YAML under conf/ composes, and every `_target_` binds to its signature (without building it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from kiln.config import check_target, config_dir, iter_targets, register_resolvers
from kiln.errors import KilnError
from kiln.hardware import with_resolved_precision

CONF = config_dir()
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_FILES = sorted(
    p for p in CONF.rglob("*.yaml") if p.parent != CONF and "hydra" not in p.relative_to(CONF).parts
)


def overrides_for(path: Path) -> list[str]:
    return [f"{path.parent.relative_to(CONF).as_posix()}={path.stem}"]


def compose_train(overrides: list[str], primary: str = "train"):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(primary, overrides=overrides, return_hydra_config=True)


def resolved(cfg) -> dict:
    # hydra.* needs the runtime; interpolations into it are resolved with a placeholder
    cfg.hydra.runtime.output_dir = "/tmp/kiln-config-test"
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_conf_tree_is_found_recursively():
    groups = {p.parent.relative_to(CONF).as_posix() for p in GROUP_FILES}
    assert {"data", "model", "trainer", "callbacks", "logger", "paths", "experiment", "debug"} <= groups
    assert len(GROUP_FILES) >= 15


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: p.relative_to(CONF).as_posix())
def test_every_group_file_composes_and_binds(path: Path):
    # hparams_search is a group of kiln search's config (search.yaml, which composes train.yaml)
    primary = "search" if path.parent.name == "hparams_search" else "train"
    cfg = compose_train(overrides_for(path), primary)
    config = resolved(cfg)
    config["trainer"] = with_resolved_precision(config["trainer"])  # as the train stage does
    targets = list(iter_targets(config))
    assert targets, "the composed config has no _target_ at all"
    for key, node in targets:
        check_target(key, node)  # raises KilnError naming the key if an argument does not bind


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes(name: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name)
    assert cfg is not None


def test_a_misspelled_argument_is_named_with_the_valid_ones():
    with pytest.raises(KilnError, match=r"data\.batch_sise: DigitsDataModule has no argument 'batch_sise'"):
        check_target("data", {"_target_": "kiln.data.DigitsDataModule", "batch_sise": 3})


def test_a_wrong_type_is_named_with_an_example():
    with pytest.raises(KilnError, match=r"trainer\.max_epochs='abc': expected an integer"):
        check_target("trainer", {"_target_": "lightning.pytorch.Trainer", "max_epochs": "abc"})


def test_an_unimportable_target_is_named():
    with pytest.raises(KilnError, match=r"model\.net\._target_=nowhere\.net: cannot import it"):
        check_target("model.net", {"_target_": "nowhere.net"})


def test_the_demo_experiment_overrides_only_what_differs():
    config = resolved(compose_train(["experiment=digits_cnn"]))
    assert config["monitor"] == {"metric": "val/loss", "mode": "min"}
    assert config["data"]["_target_"] == "kiln.data.DigitsDataModule"
    assert config["callbacks"]["early_stopping"]["monitor"] == "val/loss"
    assert config["callbacks"]["model_checkpoint"]["mode"] == "min"


@pytest.mark.parametrize(
    ("trainer", "tasks", "gpus"),
    [
        ("trainer=cpu", 1, None),
        ("trainer=ddp_cpu", 2, None),
        ("trainer=gpu", 1, 1),
        ("trainer.devices=4", 4, None),
    ],
)
def test_the_slurm_launcher_asks_for_one_task_per_device(trainer: str, tasks: int, gpus: int | None):
    cfg = compose_train(["hydra/launcher=slurm", trainer])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == tasks and launcher.gpus_per_node == gpus
    assert launcher.nodes == 1 and launcher.max_num_timeout == 0


def test_a_slurm_setting_that_cannot_fit_is_refused_with_the_fix():
    from kiln.slurm import check_launcher_fits

    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp_cpu", "hydra.launcher.tasks_per_node=1"])
    with pytest.raises(KilnError, match=r"hydra.launcher.tasks_per_node=1 but trainer.devices=2"):
        check_launcher_fits(cfg.hydra.launcher, cfg.trainer)
    cfg = compose_train(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "hydra.launcher.gpus_per_node=2"]
    )
    with pytest.raises(KilnError, match=r"trainer wants 4 GPUs per node but hydra.launcher.gpus_per_node=2"):
        check_launcher_fits(cfg.hydra.launcher, cfg.trainer)
