"""Custom OmegaConf resolvers the configs use; registered before Hydra composes a config."""

from __future__ import annotations

import os
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


def working_dir() -> str:
    """The directory vgtrain was started in (``vgtrain_cwd``, conf/paths/default.yaml).

    Unlike ``${hydra:runtime.cwd}`` it resolves before Hydra's own config exists, which a multirun
    needs: the sweep directory is resolved while the sweep is being set up."""
    return os.getcwd()


def wandb_offline() -> bool:
    """``logger.wandb.offline`` by default: offline unless ``WANDB_MODE`` says otherwise.

    Lightning's WandbLogger forces offline mode when ``offline=True``, whatever ``WANDB_MODE``
    says; so the default is True only when ``WANDB_MODE`` is unset or offline/dryrun, and
    ``WANDB_MODE=online`` (after ``wandb login``) or ``disabled`` is obeyed."""
    return os.environ.get("WANDB_MODE", "offline").strip().lower() in ("offline", "dryrun")


RESOLVERS = {
    "vgtrain_sweep_group": sweep_group,
    "vgtrain_cwd": working_dir,
    "vgtrain_wandb_offline": wandb_offline,
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
