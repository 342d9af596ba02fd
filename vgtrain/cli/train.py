"""`vgtrain train`: compose the config, build model and data, fit with Lightning, evaluate."""

from __future__ import annotations

import inspect
import json
import logging
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vgtrain.cli.explain import explain
from vgtrain.config.build import instantiate_group, prepare_synthetic_data
from vgtrain.config.paths import CONF_DIR
from vgtrain.config.resolvers import register_resolvers
from vgtrain.config.schema import TrainSchema, validate
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.conversation import ConversationCollator, conversation_collator
from vgtrain.data.pipeline import expand_urls
from vgtrain.errors import (
    CheckpointMismatchError,
    ConfigError,
    OutOfMemory,
    Preempted,
    ShardNotFoundError,
    UserExit,
    is_out_of_memory,
    oom_knobs,
)
from vgtrain.evaluation.heldout import evaluate_captions, format_examples
from vgtrain.evaluation.vqa import evaluate_vqa_splits
from vgtrain.files import atomic_write_text
from vgtrain.models.grounding import GroundingTargets
from vgtrain.training.checkpointing import resolve_resume
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.init_from import init_from_export
from vgtrain.training.module import CaptioningModule
from vgtrain.training.recovery import PreemptionCheckpoint
from vgtrain.training.speed import split_trainer_config
from vgtrain.training.sweep import optimized_value

log = logging.getLogger(__name__)
register_resolvers()  # before Hydra composes the config that uses them

# Frozen backbones are in eval mode on purpose (FrozenModule); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def build_module(cfg: DictConfig) -> CaptioningModule:
    container = OmegaConf.to_container(cfg.model, resolve=True)
    _, compile_step = split_trainer_config(cfg.trainer)
    return CaptioningModule(
        vision=container["vision"],
        llm=container["llm"],
        mapper=container["mapper"],
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=container["scheduler"],
        prompt=container["prompt"],
        xattn=container.get("xattn"),
        llm_adapter=container.get("llm_adapter"),
        chat=container.get("chat"),
        speed={**container.get("speed", {}), "compile": compile_step},
        loss_reduction=container.get("loss_reduction", "token"),
        grounding=container.get("grounding"),
    )


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """The Trainer with the configured callbacks and loggers; ``overrides`` replace trainer keys."""
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # logger=none: LearningRateMonitor refuses a trainer with nothing to log to
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    settings, _ = split_trainer_config(cfg.trainer)  # `compile` is vgtrain's (build_module), not Lightning's
    return instantiate(settings, callbacks=callbacks, logger=loggers or False, **overrides)


def pack_length(cfg: DictConfig, module: CaptioningModule) -> int:
    """``data.pack_length``, checked against the model: packed rows hold several images'
    prefixes, which cross-attention (one image per row) cannot read."""
    length = int(cfg.data.get("pack_length", 0))
    if length:
        try:
            module.model.check_packable()
        except ValueError as error:
            raise ConfigError(f"data.pack_length={length}: {error}") from None
    return length


def grounding_targets(module: CaptioningModule) -> GroundingTargets | None:
    """The collator's grounding targets (a grid cell per prefix position), when the loss is on."""
    if not module.grounding_weight:
        return None
    return GroundingTargets(
        module.model.llm.tokenizer, module.model.vision.grid_size, module.grounding_max_targets
    )


def build_collator(cfg: DictConfig, module: CaptioningModule) -> CaptionCollator | ConversationCollator:
    if cfg.model.get("chat"):  # conversations (and captions as one-turn ones): answer-only loss
        return conversation_collator(
            module.model.llm.tokenizer,
            module.model.prefix_length,
            OmegaConf.to_container(cfg.model.chat, resolve=True),
            prompt=cfg.model.prompt,
            max_tokens=cfg.data.get("max_conversation_tokens", 128),
            seed=cfg.seed,
            caption_share=float((cfg.data.get("mix") or {}).get("caption", 0.0)),
            conversations_per_visit=int(cfg.data.get("conversations_per_visit", 1)),
            pack_length=pack_length(cfg, module),
            grounding=grounding_targets(module),
        )
    if module.grounding_weight:
        raise ConfigError(
            "model.grounding needs conversation training (model.chat, e.g. experiment=demo_vqa); "
            "set model.grounding.weight=0"
        )
    return CaptionCollator(
        module.model.llm.tokenizer,
        prefix_length=module.model.prefix_length,
        prompt=cfg.model.prompt,
        max_caption_tokens=cfg.data.max_caption_tokens,
    )


def build_datamodule(cfg: DictConfig, module: CaptioningModule) -> CaptionDataModule:
    data = cfg.data
    return CaptionDataModule(
        train_urls=data.train_urls,
        val_urls=data.get("val_urls"),
        transform=module.model.vision.transform,
        collator=build_collator(cfg, module),
        batch_size=data.batch_size,
        val_batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=cfg.seed,
        cache_features=data.get("cache_features", False),
        use_cached_features=data.get("use_cached_features", False),
        vision=module.model.vision,
        resampled=data.get("resampled", True),
        samples_per_epoch=data.get("samples_per_epoch"),
        device_resident=data.get("device_resident", False),
        feature_needs=module.model.feature_needs(),
        length_group_batches=int(data.get("length_group_batches", 0)),
    )


def evaluate_after_fit(
    cfg: DictConfig, module: CaptioningModule, datamodule: CaptionDataModule
) -> dict[str, float]:
    """Greedy-decodes the configured splits; returns flat metrics and prints example captions."""
    settings = cfg.evaluate
    if isinstance(datamodule.collator, ConversationCollator):  # answers, scored by VQA accuracy
        split_urls = {split: cfg.data.get(f"{split}_urls") for split in settings.splits}
        return evaluate_vqa_splits(
            module.model,
            datamodule,
            datamodule.collator.renderer,
            split_urls,
            settings.shuffled_control,
            max_new_tokens=settings.max_new_tokens,
            keep_examples=settings.num_examples,
        )
    metrics: dict[str, float] = {}
    runs = [(split, split, False) for split in settings.splits]
    if settings.shuffled_control:
        runs.append((f"{settings.shuffled_control}_shuffled", settings.shuffled_control, True))
    for name, split, shuffled in runs:
        urls = cfg.data.get(f"{split}_urls")
        if not urls:
            log.info("evaluation: no data.%s_urls, skipping split %r", split, name)
            continue
        result = evaluate_captions(
            module.model,
            datamodule.loader(urls, train=False),
            prompt=cfg.model.prompt,
            max_new_tokens=settings.max_new_tokens,
            shuffle_images=shuffled,
            keep_examples=settings.num_examples,
            description=f"evaluating {name}",
        )
        metrics.update(result.metrics(name))
        if not shuffled:
            print(
                f"\n{name}: {result.num_samples} images, greedy decoding\n{format_examples(result.examples)}"
            )
    return metrics


def print_metrics(metrics: dict[str, float]) -> None:
    print("\nmetric                          value")
    for key, value in metrics.items():
        print(f"{key:<30} {value:>8.4f}" if isinstance(value, float) else f"{key:<30} {value}")


def check_data_urls(cfg: DictConfig) -> None:
    """Fails before any model is built when a shard is missing or a pattern is empty."""
    for split in ("train", "val"):
        urls = None if OmegaConf.is_missing(cfg.data, f"{split}_urls") else cfg.data.get(f"{split}_urls")
        if split == "train" and urls is None:
            raise ConfigError(
                "data.train_urls is not set; give the training shards, e.g. "
                "data.train_urls='/data/train-{000000..000031}.tar' (or use data=shapes)"
            )
        if urls is not None:
            try:
                expand_urls(urls)
            except ShardNotFoundError as error:
                raise ShardNotFoundError(f"data.{split}_urls: {error}") from None


def resume_checkpoint(cfg: DictConfig, run_dir: Path, module: CaptioningModule) -> Path | None:
    """The checkpoint ``resume`` (or its alias ``ckpt_path``) names, checked against the model."""
    resume, alias = cfg.get("resume"), cfg.get("ckpt_path")
    if resume and alias and str(resume) != str(alias):
        raise ConfigError(
            f"resume={resume} and ckpt_path={alias} disagree; ckpt_path is an alias, set resume only"
        )
    found = resolve_resume(resume or alias, run_dir)
    if found is None:
        return None
    path, checkpoint = found
    try:
        module.check_checkpoint(checkpoint)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path}: {error}") from None
    log.info("resuming from %s (step %d)", path, checkpoint["global_step"])
    return path


def fit(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: CaptioningModule,
    datamodule: CaptionDataModule,
    ckpt_path: Path | None,
) -> None:
    """``trainer.fit`` that loads the checkpoint weights-only and turns a SIGTERM stop and
    out-of-memory into errors that say what happened and what to change."""
    safe = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **safe)
    except SIGTERMException as stop:  # SIGTERM noticed by Lightning's loop, after our batch check
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)), None)
        raise Preempted(signal.SIGTERM, (saver and saver.message) or "stopped by SIGTERM") from stop
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        settings = ", ".join(
            f"{key}={OmegaConf.select(cfg, key)}"
            for key in (
                "data.batch_size",
                "trainer.accumulate_grad_batches",
                "trainer.precision",
                "data.cache_features",
            )
        )
        knobs = oom_knobs(
            bool(cfg.data.get("cache_features")), bf16=str(cfg.trainer.precision).startswith("bf16")
        )
        raise OutOfMemory(f"out of memory with {settings}: {knobs}") from error


def run(cfg: DictConfig) -> dict[str, float]:
    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    validate(cfg, TrainSchema)  # bad values fail here, one line each, before anything is built
    L.seed_everything(cfg.seed, workers=True)
    prepare_synthetic_data(cfg)
    check_data_urls(cfg)

    module = build_module(cfg)
    resume_path = resume_checkpoint(cfg, run_dir, module)
    if cfg.get("init_from") and resume_path is None:  # a resumed run already holds its weights
        init_from_export(module, cfg.init_from)
    datamodule = build_datamodule(cfg, module)
    module.model.llm.tokenizer.save_pretrained(run_dir / "tokenizer")
    trainer = build_trainer(cfg)
    loggers = trainer.loggers
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    fit(cfg, trainer, module, datamodule, ckpt_path=resume_path)

    metrics: dict[str, float] = {
        key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1
    }
    if cfg.evaluate.enabled and trainer.is_global_zero:
        evaluation = evaluate_after_fit(cfg, module, datamodule)
        metrics.update(evaluation)
        for logger in loggers:
            logger.log_metrics(evaluation, step=trainer.global_step)
    metrics["global_step"] = float(trainer.global_step)
    metrics["wall_seconds"] = time.perf_counter() - started
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # flush now, so the run directory stays the last line printed
    if not trainer.is_global_zero:
        return {}  # rank 0 reports; the others' metrics are partial (no evaluation)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print_metrics(metrics)
    print(f"\ncheckpoints: {run_dir / 'checkpoints'}\nrun directory:\n{run_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
        metric = cfg.get("optimized_metric")
        return optimized_value(metrics, metric) if metric and metrics else None
    except Exception as error:
        message = explain(error)
        if message is None:  # unexpected: Hydra reports it with the traceback
            raise
        raise UserExit(error, message) from error
