"""The schema a composed config is checked against before anything is built.

Hydra catches unknown keys; this catches bad values, e.g. ``data.batch_size=0`` or
``trainer.max_steps=abc``, which would otherwise surface as a DataLoader traceback or
``'<' not supported between instances of 'str' and 'int'`` deep inside Lightning. Each bad value
becomes one line naming its key, its value and what is allowed.

The schema mirrors the config tree as dataclasses; each field's ``metadata`` holds its rule. Only
the keys listed here are checked: Lightning's Trainer and the optimizers take many more, which
they check themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vgtrain.errors import ConfigError

PRECISIONS = (
    "32-true",
    "32",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "transformer-engine",
)


@dataclass(frozen=True)
class Rule:
    """What a value may be: ``accepts`` decides, ``allowed`` says it in words."""

    accepts: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(minimum: int, *, optional: bool = False, also: tuple[Any, ...] = ()) -> Any:
    words = f"an integer >= {minimum}" + "".join(f" or {v}" for v in also) + (" or null" if optional else "")
    rule = Rule(
        lambda v: (optional and v is None) or v in also or (_is_int(v) and v >= minimum),
        words,
    )
    return field(default=None, metadata={"rule": rule})


def number(
    minimum: float, maximum: float | None = None, *, above: bool = False, optional: bool = False
) -> Any:
    low = f"> {minimum}" if above else f">= {minimum}"
    words = f"a number {low}" + (f" and <= {maximum}" if maximum is not None else "")
    words += " or null" if optional else ""

    def accepts(v: Any) -> bool:
        if optional and v is None:
            return True
        if not _is_number(v):
            return False
        return (v > minimum if above else v >= minimum) and (maximum is None or v <= maximum)

    return field(default=None, metadata={"rule": Rule(accepts, words)})


def flag() -> Any:
    return field(default=None, metadata={"rule": Rule(lambda v: isinstance(v, bool), "true or false")})


def one_of(*choices: Any) -> Any:
    words = "one of " + ", ".join(map(str, choices))
    return field(default=None, metadata={"rule": Rule(lambda v: v in choices or str(v) in choices, words)})


def steps_or_fraction() -> Any:
    """Lightning's val_check_interval / limit_*_batches: a count (int) or a fraction (float in (0, 1])."""
    rule = Rule(
        lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
        "an integer >= 0 (batches), a fraction in [0.0, 1.0] or null",
    )
    return field(default=None, metadata={"rule": rule})


@dataclass
class DataSchema:
    batch_size: int = integer(1)
    val_batch_size: int = integer(1)
    num_workers: int = integer(0)
    shuffle_buffer: int = integer(0)
    max_caption_tokens: int = integer(1)
    cache_features: bool = flag()
    use_cached_features: bool = flag()
    resampled: bool = flag()
    samples_per_epoch: int | None = integer(1, optional=True)


@dataclass
class TrainerSchema:
    max_steps: int = integer(1, also=(-1,))
    max_epochs: int | None = integer(1, optional=True, also=(-1,))
    num_nodes: int = integer(1)
    precision: str = one_of(*PRECISIONS)
    accumulate_grad_batches: int = integer(1)
    val_check_interval: Any = steps_or_fraction()
    limit_val_batches: Any = steps_or_fraction()
    log_every_n_steps: int = integer(1)
    gradient_clip_val: float | None = number(0.0, optional=True)


@dataclass
class OptimizerSchema:
    lr: float = number(0.0, above=True)


@dataclass
class SchedulerSchema:
    warmup_steps: int = integer(0)
    min_lr_ratio: float = number(0.0, 1.0)
    decay_fraction: float = number(0.0, 1.0, above=True)


@dataclass
class GroundingSchema:
    weight: float = number(0.0)
    max_targets: int = integer(1)
    layer: int | None = integer(0, optional=True)


@dataclass
class ModelSchema:
    loss_reduction: str = one_of("token", "sample")
    grounding: GroundingSchema = field(default_factory=GroundingSchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)


@dataclass
class FaultToleranceSchema:
    checkpoint_every_n_steps: int = integer(1)
    keep_last_checkpoints: int = integer(1, also=(-1,))
    max_consecutive_nonfinite: int = integer(1)


@dataclass
class EvaluateSchema:
    enabled: bool = flag()
    max_new_tokens: int = integer(1)
    num_examples: int = integer(0)


@dataclass
class TrainSchema:
    """`vgtrain train` (conf/train.yaml)."""

    seed: int = integer(0)
    data: DataSchema = field(default_factory=DataSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    train: FaultToleranceSchema = field(default_factory=FaultToleranceSchema)
    evaluate: EvaluateSchema = field(default_factory=EvaluateSchema)


@dataclass
class EvalSchema:
    """`vgtrain eval` (conf/eval.yaml)."""

    limit: int | None = integer(1, optional=True)
    batch_size: int = integer(1)


def problems(cfg: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """One line per value of ``cfg`` that ``schema`` refuses; keys absent from ``cfg`` are skipped."""
    found: list[str] = []
    for item in dataclasses.fields(schema):
        key = f"{prefix}{item.name}"
        if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
            continue
        section = item.default_factory
        if section is not dataclasses.MISSING and dataclasses.is_dataclass(section):
            found += problems(cfg, section, prefix=f"{key}.")
            continue
        rule: Rule = item.metadata["rule"]
        value = OmegaConf.select(cfg, key)
        if not rule.accepts(value):
            found.append(f"{key}={value!r} is not allowed (allowed: {rule.allowed})")
    return found


def validate(cfg: DictConfig, schema: type) -> None:
    """Raises one ConfigError listing every bad value, before anything is built."""
    found = problems(cfg, schema)
    if found:
        raise ConfigError("config: " + "; ".join(found))
