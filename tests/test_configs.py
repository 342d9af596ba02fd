"""Every YAML file under conf/ is loaded by composing the config that uses it."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vgtrain.paths import CONF_DIR

GROUPS = [
    "model/vision",
    "model/llm",
    "model/mapper",
    "model/xattn",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


CASES = [(group, option) for group in GROUPS for option in _options(group)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg.model.vision.name and cfg.model.llm.name and cfg.model.mapper.name and cfg.model.xattn.name
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    # Interpolations that do not need a running Hydra job resolve.
    OmegaConf.to_container(cfg.model, resolve=True)


def test_every_yaml_file_is_covered():
    files = {p.relative_to(CONF_DIR).with_suffix("").as_posix() for p in Path(CONF_DIR).rglob("*.yaml")}
    covered = {f"{group}/{option}" for group, option in CASES} | {"train", "paths/default", "hydra/default"}
    assert files <= covered, files - covered


def test_demo_is_the_default_experiment():
    cfg = _compose([])
    assert "demo" in cfg.tags
    assert cfg.model.llm.trainable is True and cfg.data.cache_features is True


def test_a_typo_in_an_override_fails_fast():
    with pytest.raises(Exception, match="max_stepz"):
        _compose(["trainer.max_stepz=5"])


def test_xattn_demo_composes_both_routes():
    cfg = _compose(["experiment=demo_xattn"])
    assert cfg.model.mapper.name == "none" and cfg.model.xattn.name == "gated"
    assert cfg.model.llm.trainable is True  # inherited from the demo
    both = _compose(["experiment=demo_prefix_xattn"])
    assert both.model.mapper.name == "transformer" and both.model.xattn.name == "gated"
