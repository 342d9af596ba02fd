"""Errors a user can act on come out of `vgtrain train` as one line naming the key or file.

The CLI runs in-process here (no interpreter start-up per case); test_cli.py covers the
subprocess path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import vgtrain.cli.train  # noqa: F401  Lightning binds a log handler to stderr on import: not to a test's capsys
from tests.test_cli import TINY_OVERRIDES
from vgtrain import cli


def _vgtrain(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Runs `vgtrain <args>` in this process; returns the exit code and the stderr lines."""
    capsys.readouterr()  # only what this command prints
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main hands Hydra its own argv
    # Hydra's logging setup would keep handlers on streams pytest closes after each test.
    code = cli.main([*args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    return code, capsys.readouterr().err.strip()


def _tiny(shapes_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    return [
        "train",
        *TINY_OVERRIDES,
        "data.synthetic=null",
        f"data.train_urls='{patterns['train']}'",
        f"data.val_urls='{patterns['val']}'",
        "evaluate.enabled=false",
        "trainer.limit_val_batches=0",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    """Exit code 1, no traceback, and the last line of stderr (before it, at most progress bars)
    is the error naming every needle."""
    assert code == 1
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("vgtrain train: error: ") and err.count("error:") == 1, err
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize(
    "override,needles",
    [
        ("trainer.max_stepz=5", ["'trainer.max_stepz'", "did you mean 'max_steps'"]),
        ("seeed=1", ["'seeed'", "did you mean 'seed'"]),
        ("model/mapper=mlpp", ["'mlpp'", "'model/mapper'", "did you mean 'mlp'"]),
        ("data.train_urls=/d/x-{0..3}.tar", ["data.train_urls=/d/x-{0..3}.tar", "quote"]),
    ],
    ids=["key", "top-level-key", "group-option", "unquoted-braces"],
)
def test_config_mistakes_name_the_key_and_the_closest_valid_one(
    monkeypatch, capsys, tmp_path, override, needles
):
    code, err = _vgtrain(monkeypatch, capsys, "train", override, f"hydra.run.dir={tmp_path}")
    _assert_one_line(code, err, *needles)


def test_verbose_shows_the_traceback(monkeypatch, capsys, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _vgtrain(monkeypatch, capsys, "train", "trainer.max_stepz=5", "--verbose")


def test_missing_shard_and_empty_pattern_are_named(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "shards" / "train-000001.tar"
    code, err = _vgtrain(
        monkeypatch,
        capsys,
        "train",
        "data=custom",
        f"data.train_urls='{tmp_path}/shards/train-{{000000..000001}}.tar'",
        f"hydra.run.dir={tmp_path}",
    )
    _assert_one_line(code, err, "data.train_urls", str(missing))
    code, err = _vgtrain(
        monkeypatch, capsys, "train", "data=custom", "data.train_urls=", f"hydra.run.dir={tmp_path}"
    )
    _assert_one_line(code, err, "data.train_urls", "empty")
    code, err = _vgtrain(monkeypatch, capsys, "train", "data=custom", f"hydra.run.dir={tmp_path}")
    _assert_one_line(code, err, "data.train_urls is not set")


def test_unknown_backbone_lists_the_registered_ones(monkeypatch, capsys, shapes_dir, tmp_path):
    code, err = _vgtrain(monkeypatch, capsys, *_tiny(shapes_dir, tmp_path, "model.vision.name=clip_vit_b99"))
    _assert_one_line(code, err, "'clip_vit_b99'", "clip_vit_b32", "tiny")


def test_checkpoint_from_another_backbone_or_adapter_shape_names_file_and_tensor(
    monkeypatch, capsys, shapes_dir, tmp_path
):
    code, _ = _vgtrain(monkeypatch, capsys, *_tiny(shapes_dir, tmp_path / "a", "trainer.max_steps=1"))
    assert code == 0
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    code, err = _vgtrain(
        monkeypatch,
        capsys,
        *_tiny(shapes_dir, tmp_path / "b", f"resume={checkpoint}", "model.mapper.width=32"),
    )
    _assert_one_line(code, err, str(checkpoint), "model.mapper.", "64] in the checkpoint", "32] here")
    code, err = _vgtrain(
        monkeypatch,
        capsys,
        *_tiny(shapes_dir, tmp_path / "c", f"resume={checkpoint}", "model.vision.init_seed=7"),
    )
    _assert_one_line(code, err, str(checkpoint), "vision backbone", "weights_digest")


def test_tokenizer_without_eos_names_where_it_came_from(monkeypatch, capsys, shapes_dir, tmp_path):
    from vgtrain.models.backbones.tiny import build_tiny_gpt2, build_tiny_tokenizer

    folder = tmp_path / "llm-without-eos"
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gpt2(tokenizer, width=64, layers=1, heads=2)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    code, err = _vgtrain(
        monkeypatch, capsys, *_tiny(shapes_dir, tmp_path / "run", f"model.llm.path={folder}")
    )
    _assert_one_line(code, err, "no EOS token", str(folder))


def test_out_of_memory_names_the_knobs(monkeypatch, capsys, shapes_dir, tmp_path):
    from vgtrain.training.module import CaptioningModule

    def out_of_memory(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CaptioningModule, "training_step", out_of_memory)
    code, err = _vgtrain(monkeypatch, capsys, *_tiny(shapes_dir, tmp_path))
    _assert_one_line(
        code,
        err,
        "out of memory",
        "data.batch_size=16",
        "trainer.accumulate_grad_batches=1",
        "trainer.precision=bf16-mixed",  # the demo's
        "data.cache_features=True",
    )
    assert "set data.cache_features=true" not in err  # already on: not offered
    assert "use trainer.precision=bf16-mixed" not in err  # likewise
