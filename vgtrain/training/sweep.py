"""Hyperparameter sweeps: every trial's result in one file (the wandb group per sweep is the
``vgtrain_sweep_group`` resolver of :mod:`vgtrain.config.resolvers`).

A sweep is Hydra's multirun (`vgtrain train -m ...`): a grid from comma-separated overrides, or
an Optuna search with `hparams_search=mapper_optuna`. Each trial is an ordinary training run in
its own subdirectory of ``hydra.sweep.dir``. :class:`TrialResults` (a Hydra callback, enabled in
conf/hydra/default.yaml) appends each finished trial to ``trials.jsonl`` there and, when the
sweep ends, writes ``trials.json``: all trials and the best by the optimised metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vgtrain.errors import ConfigError
from vgtrain.files import atomic_write_text

TRIALS_LOG = "trials.jsonl"
TRIALS_SUMMARY = "trials.json"


def optimized_value(metrics: dict[str, Any], metric: str) -> float | None:
    """The value a sweeper optimises. In a sweep a missing metric is a clear error naming the
    metrics the run did produce; a single run without it (e.g. no validation) returns None."""
    if metric not in metrics:
        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        raise ConfigError(
            f"optimized_metric={metric!r} was not produced by this run; it logged: {', '.join(sorted(metrics))}"
        )
    return float(metrics[metric])


class TrialResults(Callback):
    """Records each multirun trial (overrides, optimised value, all metrics, status)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return
        output_dir = Path(hydra_cfg.runtime.output_dir)
        metrics_file = output_dir / "metrics.json"
        completed = job_return.status == JobStatus.COMPLETED
        trial: dict[str, Any] = {
            "number": int(hydra_cfg.job.num),
            "overrides": list(job_return.overrides or []),
            "status": "completed" if completed else "failed",
            "value": job_return._return_value if completed else None,
            "output_dir": str(output_dir),
            "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else {},
        }
        if not completed:
            trial["error"] = repr(job_return._return_value)
        # One line per trial, appended: a crash mid-sweep keeps the trials already finished.
        with open(Path(hydra_cfg.sweep.dir) / TRIALS_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(trial, default=str) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        log = sweep_dir / TRIALS_LOG
        if not log.is_file():
            return
        trials = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]
        direction = str(OmegaConf.select(config, "hydra.sweeper.direction", default="minimize"))
        scored = [
            t for t in trials if isinstance(t["value"], int | float) and math.isfinite(float(t["value"]))
        ]
        pick = max if direction.lower().startswith("max") else min
        best = pick(scored, key=lambda t: float(t["value"])) if scored else None
        summary = {
            "optimized_metric": OmegaConf.select(config, "optimized_metric"),
            "direction": direction,
            "num_trials": len(trials),
            "best": best,
            "trials": trials,
        }
        atomic_write_text(sweep_dir / TRIALS_SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
        if best is not None:
            print(f"sweep: {len(trials)} trials, best {best['value']:.4f} with {' '.join(best['overrides'])}")
        print(f"sweep results: {sweep_dir / TRIALS_SUMMARY}")
