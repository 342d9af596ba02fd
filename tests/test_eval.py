"""`vgtrain eval`: a tiny export through the CLI -> predictions.jsonl, metrics.json, report.html."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.tiny_checkpoints import train_tiny
from vgtrain.cli import main as cli_main
from vgtrain.config.paths import CONF_DIR
from vgtrain.data.shards import write_shard
from vgtrain.evaluation.report import loss_svg, training_history
from vgtrain.export.writer import export_checkpoint
from vgtrain.metrics import METRIC_KEYS, caption_metrics

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def exported(shapes_dir, tmp_path_factory) -> Path:
    trained = train_tiny(tmp_path_factory.getbasetemp(), shapes_dir, "frozen")
    return export_checkpoint(trained.checkpoint, tmp_path_factory.mktemp("eval") / "export")


@pytest.fixture(scope="module")
def eval_shard(shapes_dir, tmp_path_factory) -> Path:
    """Six validation images: odd ones with several references in {key}.json (as `vgtrain shards`
    writes them), even ones with their {key}.txt only; plus one sample without a caption."""
    source = shapes_dir / json.loads((shapes_dir / "manifest.json").read_text())["shards"]["val"][0]
    samples: dict[str, dict] = {}
    with tarfile.open(source) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if len(samples) == NUM_IMAGES and key not in samples:
                break
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    out = []
    for index, sample in enumerate(samples.values()):
        caption = sample["txt"].decode()
        item = {"__key__": sample["__key__"], "png": sample["png"], "txt": caption}
        if index % 2:
            item["json"] = json.dumps({"captions": [caption, f"A picture: {caption}."]})
        out.append(item)
    out.append({"__key__": "no_caption", "png": out[0]["png"]})
    path = tmp_path_factory.mktemp("eval_data") / "val-000000.tar"
    write_shard(path, out)
    return path


def test_eval_cli_writes_predictions_metrics_and_report(exported, eval_shard, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = cli_main(
        [
            "eval",
            f"export={exported}",
            f"data.val_urls={eval_shard}",
            "decode=greedy",
            "decode.options.max_new_tokens=8",
            "logger=csv",
            "metrics.meteor=false",  # METEOR's Java start-up is tested in test_metrics.py
            "metrics.spice=false",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "bleu_4" in out and "cider" in out and str(run_dir) in out

    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_IMAGES  # the sample without a caption is skipped
    assert [len(r["references"]) for r in rows] == [1, 2, 1, 2, 1, 2]
    assert all(isinstance(r["prediction"], str) and "cider" in r["metrics"] for r in rows)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= metrics.keys()
    # The figures are those of the predictions written beside them (scored again here), the
    # per-image ones too; CLIPScore's corpus figure is the mean of its per-image ones.
    again = caption_metrics(
        {r["key"]: r["prediction"] for r in rows},
        {r["key"]: r["references"] for r in rows},
        metrics=["bleu", "rouge_l", "cider"],
    )
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert metrics[key] == pytest.approx(again.values[key], abs=1e-9), key
        assert [r["metrics"][key] for r in rows] == pytest.approx(
            [again.per_image[r["key"]][key] for r in rows], abs=1e-9
        ), key
    for key in ("clipscore", "refclipscore"):
        per_image = [r["metrics"][key] for r in rows]
        assert all(0 <= v <= 2.5 for v in per_image), key  # w * max(cos, 0), w = 2.5
        assert metrics[key] == pytest.approx(sum(per_image) / len(per_image), abs=1e-6), key
    assert metrics["meteor"] is None and "metrics.meteor=false" in metrics["skipped"]["meteor"]
    assert metrics["spice"] is None and "spice" in metrics["skipped"]
    assert metrics["num_images"] == NUM_IMAGES and metrics["skipped_samples"] == {"missing_caption": 1}
    assert metrics["decode"]["strategy"] == "greedy"

    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == NUM_IMAGES
    assert "id='metrics'" in page and "bleu_4" in page
    assert all(r["references"][-1].replace('"', "&quot;") in page for r in rows)
    # The tiny checkpoint was trained without a logger: the report says so instead of plotting.
    assert "No loss curves" in page
    assert (run_dir / "csv").is_dir()  # logged through the configured logger


def test_report_renders_in_headless_chromium(exported, eval_shard, tmp_path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium) to render report.html")
    csv_log = tmp_path / "metrics.csv"
    csv_log.write_text("step,train/loss,val/loss\n10,2.5,\n20,1.5,\n20,,1.7\n30,1.0,\n40,0.8,0.9\n")
    run_dir = tmp_path / "run"
    args = ["eval", f"export={exported}", f"data.val_urls={eval_shard}", "decode=beam", "logger=none"]
    args += ["metrics.meteor=false", "metrics.spice=false", f"report.training_log={csv_log}"]
    assert cli_main([*args, "decode.options.max_new_tokens=6", f"hydra.run.dir={run_dir}"]) == 0
    page = run_dir / "report.html"
    assert "<svg" in page.read_text() and "No loss curves" not in page.read_text()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert '<table class="metrics" id="metrics">' in dom and dom.count("<img") == NUM_IMAGES
    assert "<polyline" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, plot and images drawn, not a blank page


def test_bad_export_and_bad_decode_option_are_one_line_errors(eval_shard, tmp_path, capsys) -> None:
    base = [f"data.val_urls={eval_shard}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    assert cli_main(["eval", f"export={tmp_path / 'nope'}", *base]) == 1
    assert "not an export directory" in capsys.readouterr().err
    assert (
        cli_main(["eval", f"export={tmp_path}", "decode=greedy", "+decode.options.num_beams=2", *base]) == 1
    )
    assert "has no option 'num_beams'" in capsys.readouterr().err


def test_training_history_from_the_csv_log(tmp_path) -> None:
    run_dir = tmp_path / "train_run"
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    (run_dir / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,9,3.0,\n0,19,2.0,\n0,19,,2.2\n"
    )
    history = training_history(None, run_dir)
    assert history.curves == {"train/loss": [(9.0, 3.0), (19.0, 2.0)], "val/loss": [(19.0, 2.2)]}
    assert "<polyline" in loss_svg(history.curves)
    assert "no CSV metrics log" in training_history(None, tmp_path / "empty").missing


def test_the_wandb_logger_preset_writes_the_csv_log_the_report_reads() -> None:
    """The report reads no wandb file: a wandb run must leave the CSV log beside it."""
    loggers = OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml")
    assert loggers.wandb._target_.endswith("WandbLogger")
    assert loggers.csv._target_ == "lightning.pytorch.loggers.CSVLogger" and loggers.csv.name == "csv"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "decode").glob("*.yaml")))
def test_every_decode_option_composes_into_a_valid_strategy(option: str) -> None:
    from vgtrain.decode.strategies import get_strategy

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"decode={option}", "export=/x"])
    get_strategy(cfg.decode.strategy).resolve(dict(cfg.decode.options))
    assert cfg.split == "val" and cfg.metrics.clip is None
    assert cfg.decode.strategy == option  # `decode=NAME` is `vgtrain caption --strategy NAME`


def test_one_decoding_vocabulary_for_configs_the_cli_and_the_api() -> None:
    """Strategy names: the registry = the decode/ configs = --strategy choices. Option names: every
    --flag is spelt as the option it sets, and every option a strategy takes has its flag."""
    from vgtrain.cli.caption import OPTIONS, build_parser
    from vgtrain.decode.base import COMMON_OPTIONS
    from vgtrain.decode.strategies import STRATEGIES

    assert sorted(p.stem for p in (CONF_DIR / "decode").glob("*.yaml")) == sorted(STRATEGIES)
    parser = build_parser()
    (strategy_flag,) = [a for a in parser._actions if "--strategy" in a.option_strings]
    assert sorted(strategy_flag.choices) == sorted(STRATEGIES)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest in OPTIONS}
    assert set(flags) == set(OPTIONS)
    for option, strings in flags.items():
        assert strings == ["--" + option.replace("_", "-")], strings
    taken = set(COMMON_OPTIONS).union(*(set(strategy.defaults) for strategy in STRATEGIES.values()))
    assert taken == set(OPTIONS)
