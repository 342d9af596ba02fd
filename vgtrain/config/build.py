"""From a composed config to what a command needs: the config itself outside a Hydra app, its
instantiated groups, and the embedded dataset it asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vgtrain.config.paths import CONF_DIR
from vgtrain.config.resolvers import register_resolvers
from vgtrain.data.shapes_vqa import write_shapes_vqa_dataset
from vgtrain.data.synthetic import write_shapes_dataset
from vgtrain.errors import ConfigError


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The config `vgtrain train OVERRIDES` would run with (no run directory is created)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # paths.output_dir uses ${hydra:runtime.output_dir}
    return cfg


def instantiate_group(group: DictConfig | None) -> list[Any]:
    return [instantiate(item) for item in (group or {}).values() if item is not None]


def prepare_synthetic_data(cfg: DictConfig) -> None:
    """Generates the embedded dataset if the data config asks for it; fills in its shard URLs."""
    options = cfg.data.get("synthetic")
    if not options:
        return
    options = OmegaConf.to_container(options, resolve=True)
    if "root" not in options:
        raise ConfigError(
            f"data.synthetic needs a root folder to generate into; got {options} (or set data.synthetic=null)"
        )
    # `generator: vqa` writes questions and dialogues about the same scenes (data/shapes_vqa.py).
    writer = (
        write_shapes_vqa_dataset if options.pop("generator", "captions") == "vqa" else write_shapes_dataset
    )
    manifest = writer(Path(options.pop("root")), **options)
    with open_dict(cfg):
        for split, pattern in manifest["patterns"].items():
            if cfg.data.get(f"{split}_urls") is None:
                cfg.data[f"{split}_urls"] = pattern
