"""Custom OmegaConf resolvers the configs use; registered before Hydra composes a config."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def sweep_group() -> str | None:
    """wandb group of this run: the sweep's directory name in a multirun, none otherwise.

    Registered as the ``vgtrain_sweep_group`` resolver (conf/logger/wandb.yaml)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hydra_cfg.sweep.dir)
    return f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vgtrain_sweep_group"):
        OmegaConf.register_new_resolver("vgtrain_sweep_group", sweep_group)
