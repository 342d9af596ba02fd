"""Bad config values fail before anything is built: one line naming the key, the value and what
is allowed (the schema in vgtrain/config/schema.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.test_configs import CASES, _compose
from tests.test_errors import _assert_one_line, _vgtrain
from vgtrain.config.schema import EvalSchema, TrainSchema, problems, validate
from vgtrain.errors import ConfigError


@pytest.mark.parametrize(
    "override, needles",
    [
        ("data.batch_size=0", ["data.batch_size=0", "an integer >= 1"]),
        ("trainer.max_steps=abc", ["trainer.max_steps='abc'", "an integer >= 1 or -1"]),
        ("trainer.precision=bf17", ["trainer.precision='bf17'", "bf16-mixed"]),
        ("model.optimizer.lr=-0.1", ["model.optimizer.lr=-0.1", "a number > 0.0"]),
        ("data.cache_features=maybe", ["data.cache_features='maybe'", "true or false"]),
        ("trainer.limit_val_batches=1.5", ["trainer.limit_val_batches=1.5", "fraction"]),
        ("model.loss_reduction=mean", ["model.loss_reduction='mean'", "one of token, sample"]),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(
    monkeypatch, capsys, tmp_path, override, needles
):
    code, err = _vgtrain(monkeypatch, capsys, "train", override, "logger=none", f"hydra.run.dir={tmp_path}")
    _assert_one_line(code, err, *needles)
    assert not (tmp_path / "checkpoints").exists()  # failed before anything was built


def test_every_bad_value_is_named_at_once():
    cfg = OmegaConf.create({"data": {"batch_size": 0, "num_workers": -1}, "trainer": {"max_steps": 10}})
    assert problems(cfg, TrainSchema) == [
        "data.batch_size=0 is not allowed (allowed: an integer >= 1)",
        "data.num_workers=-1 is not allowed (allowed: an integer >= 0)",
    ]
    with pytest.raises(ConfigError, match="batch_size=0.*num_workers=-1"):
        validate(cfg, TrainSchema)
    # true is not an integer, though Python's bool is an int
    assert problems(OmegaConf.create({"batch_size": True}), EvalSchema)


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_shipped_config_passes_the_schema(group, option):
    cfg = _compose([f"{group}={option}"])
    assert problems(cfg, TrainSchema) == []
