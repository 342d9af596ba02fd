"""Scaling out: trainer presets, data split across ranks and workers, DDP on CPU processes."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from tests.conftest import (
    TINY_LLM,
    TINY_MAPPER,
    TINY_MODEL_OVERRIDES,
    TINY_VISION,
    quiet_trainer,
    run_vgtrain,
    tiny_datamodule,
    tiny_module,
)
from vgtrain.config.paths import CONF_DIR
from vgtrain.config.resolvers import register_resolvers
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.pipeline import caption_dataset, check_shard_split
from vgtrain.data.synthetic import write_shapes_dataset
from vgtrain.errors import ConfigError
from vgtrain.models import build_model
from vgtrain.training.strategies import DecoderBlockPolicy


def _compose(overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("preset", ["ddp", "ddp_cpu", "fsdp"])
def test_distributed_presets_build_their_strategy(preset):
    cfg = _compose([f"trainer={preset}", "trainer.num_nodes=2", "trainer.accumulate_grad_batches=4"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy if preset == "fsdp" else DDPStrategy)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.accumulate_grad_batches == 4
    if preset == "ddp_cpu":
        assert cfg.trainer.accelerator == "cpu" and strategy._process_group_backend == "gloo"
    else:  # GPU presets compose (and build) where no GPU exists
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_gpu_preset_precision_is_overridable():
    cfg = _compose(["trainer=gpu", "trainer.precision=16-mixed", "trainer.devices=4"])
    assert cfg.trainer.precision == "16-mixed" and cfg.trainer.devices == 4


def test_fsdp_policy_wraps_each_llm_decoder_block_only():
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER))
    policy = DecoderBlockPolicy()
    assert policy(model, recurse=True, nonwrapped_numel=0)  # the root: descend
    wrapped = [name for name, module in model.named_modules() if policy(module, False, 0)]
    blocks = [name for name, module in model.named_modules() if isinstance(module, GPT2Block)]
    assert wrapped == blocks and len(blocks) == TINY_LLM["arch"]["layers"]
    assert not policy(model.mapper, recurse=False, nonwrapped_numel=0)
    strategy = instantiate(
        _compose(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"]).trainer.strategy
    )
    assert isinstance(strategy._activation_checkpointing_kwargs.get("auto_wrap_policy"), DecoderBlockPolicy)


def _keys_read(urls: str, rank: int, world_size: int, batches: int, monkeypatch) -> list[str]:
    """The sample keys one rank's training stream yields in its first pass (webdataset reads
    the rank from RANK/WORLD_SIZE, as torchrun and Lightning set them)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER))
    collate = CaptionCollator(model.llm.tokenizer, prefix_length=model.prefix_length)
    stream = caption_dataset(
        urls,
        transform=model.vision.transform,
        collate=collate,
        batch_size=16,
        train=True,
        shuffle_buffer=0,
        resampled=False,
        batches_per_epoch=batches,
    )
    return [key for batch in stream for key in batch["keys"]]


def test_ranks_read_disjoint_shards_without_resampling(shapes_dir, monkeypatch):
    urls = str(shapes_dir / "train-{000000..000001}.tar")
    # Two 128-sample shards, an epoch of 8 batches of 16 per rank: each rank reads one shard.
    rank0 = _keys_read(urls, 0, 2, 8, monkeypatch)
    rank1 = _keys_read(urls, 1, 2, 8, monkeypatch)
    everything = _keys_read(urls, 0, 1, 16, monkeypatch)
    assert len(set(rank0)) == len(rank0) == 128 and len(set(rank1)) == len(rank1) == 128
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == set(everything)


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error():
    check_shard_split(8, world_size=2, num_workers=4, urls="x")
    with pytest.raises(ConfigError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\) = 4 readers"):
        check_shard_split(3, world_size=2, num_workers=2, urls="/data/train-{0..2}.tar")


def test_samples_per_epoch_sets_the_steps_per_epoch(shapes_dir, tmp_path):
    urls = str(shapes_dir / "train-{000000..000001}.tar")
    datamodule = tiny_datamodule(tiny_module(), urls, batch_size=8, samples_per_epoch=40)
    datamodule.trainer = quiet_trainer(tmp_path, steps=1)
    loader = datamodule.train_dataloader()
    assert len(loader) == 5 and sum(1 for _ in loader) == 5  # 40 samples / batch 8, every epoch
    assert sum(1 for _ in loader) == 5
    datamodule.samples_per_epoch = 4
    with pytest.raises(ConfigError, match="less than one global batch"):
        datamodule.worker_batches_per_epoch()


def _train(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_vgtrain(
        "train",
        "logger=csv",
        "evaluate.enabled=false",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        "data.cache_features=false",
        "data.resampled=false",
        "data.samples_per_epoch=16",
        "data.shuffle_buffer=0",
        "data.num_workers=0",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=8",
        "data.synthetic.num_heldout=8",
        "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=4",
        *TINY_MODEL_OVERRIDES,
        "model.scheduler.warmup_steps=2",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        "trainer.gradient_clip_val=null",
        # fp32: the demo trains in bf16, where two summation orders differ by more than rounding.
        "trainer.precision=32-true",
        # SGD: an update is linear in the gradient. (Adam divides by the gradient's magnitude, so
        # on parameters whose true gradient is zero, e.g. attention key biases, it turns float
        # rounding noise into full-size steps that differ between any two summation orders.)
        "model.optimizer._target_=torch.optim.SGD",
        "~model.optimizer.betas",
        "+model.optimizer.momentum=0.9",
        "model.optimizer.lr=0.1",
        *overrides,
        cwd=run_dir.parent,
    )


def test_ddp_on_two_cpu_processes_equals_one_process_with_the_global_batch(tmp_path):
    """4 shards of 4 samples; 2 ranks x batch 4 read disjoint shards and step exactly like one
    process with batch 8 over the same shards: the same adapter after 4 steps (2 epochs)."""
    write_shapes_dataset(
        tmp_path / "shapes",
        num_train=16,
        num_val=8,
        num_heldout=8,
        image_size=32,
        samples_per_shard=4,
        progress=False,
    )  # written once here, so the two runs cannot race to generate it
    ddp = _train(tmp_path / "ddp", tmp_path, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=4")
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = _train(tmp_path / "single", tmp_path, "trainer=cpu", "data.batch_size=8")
    assert single.returncode == 0, single.stderr[-4000:]

    def adapter(run: str) -> dict[str, torch.Tensor]:
        checkpoint = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 4
        return checkpoint["state_dict"]

    ddp_state, single_state = adapter("ddp"), adapter("single")
    assert ddp_state.keys() == single_state.keys() and len(ddp_state) > 10
    for name, tensor in single_state.items():
        torch.testing.assert_close(ddp_state[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # Gradients flowed (non-zero momentum), so equal weights mean equal steps.
    optimizer = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)[
        "optimizer_states"
    ]
    assert sum(float(state["momentum_buffer"].abs().sum()) for state in optimizer[0]["state"].values()) > 0
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["global_step"] == 4
