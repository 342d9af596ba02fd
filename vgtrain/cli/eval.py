"""`vgtrain eval export=DIR data.val_urls=... decode=beam`: caption a split with an exported adapter
and score it as the field reports it.

Writes into the run directory: ``predictions.jsonl`` (one image per line: key, prediction,
references, per-image scores), ``metrics.json`` (bleu_1..bleu_4, meteor, rouge_l, cider, spice,
clipscore, refclipscore; a metric that could not be computed is null with the reason under
``skipped``) and ``report.html``; prints a table and logs to the configured loggers.

References: a sample's ``{key}.json`` ``captions`` list when present (what `vgtrain shards` writes
for images with several captions), else its ``{key}.txt``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from vgtrain.cli.explain import explain
from vgtrain.config.build import instantiate_group, prepare_synthetic_data
from vgtrain.config.paths import CONF_DIR
from vgtrain.config.resolvers import register_resolvers
from vgtrain.config.schema import EvalSchema, validate
from vgtrain.data.pipeline import SkipCounter, decode_sample_image, expand_urls
from vgtrain.errors import ConfigError, ShardNotFoundError, UserExit
from vgtrain.evaluation.report import image_data_uri, render_report, training_history
from vgtrain.export.artifact import ArtifactError, read_manifest
from vgtrain.files import atomic_write_text
from vgtrain.metrics import METRIC_KEYS, ClipScorer, MetricReport, caption_metrics

log = logging.getLogger(__name__)
register_resolvers()  # conf/logger/wandb.yaml uses them


@dataclass
class Sample:
    key: str
    image: Image.Image
    references: list[str]


def sample_references(sample: dict[str, Any]) -> list[str]:
    """``json["captions"]`` (several references) when present, else the ``txt`` caption."""
    meta = sample.get("json")
    if meta is not None:
        try:
            captions = json.loads(meta).get("captions") if isinstance(meta, (bytes, str)) else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            captions = None
        if isinstance(captions, list):
            found = [str(c).strip() for c in captions if isinstance(c, str) and c.strip()]
            if found:
                return found
    text = sample.get("txt")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [text.strip()] if text and text.strip() else []


def read_split(urls: str, limit: int | None, counter: SkipCounter) -> Iterator[Sample]:
    """Samples of the shards, in order, each once; unreadable ones are counted and skipped."""
    import webdataset as wds

    stages = [wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples(handler=counter.tar_error)]
    count = 0
    for sample in wds.DataPipeline(*stages):
        references = sample_references(sample)
        if not references:
            counter.skip("missing_caption", f"{sample.get('__key__')} in {sample.get('__url__')}")
            continue
        image = decode_sample_image(sample, counter)
        if image is None:
            continue
        yield Sample(str(sample["__key__"]), image, references)
        count += 1
        if limit is not None and count >= limit:
            return


def training_run_dir(manifest: dict[str, Any]) -> Path | None:
    """The run directory of the checkpoint an export came from (`vgtrain train` writes checkpoints
    to RUN_DIR/checkpoints/), or None for a checkpoint saved elsewhere."""
    checkpoint = (manifest.get("checkpoint") or {}).get("path")
    if not checkpoint or Path(checkpoint).parent.name != "checkpoints":
        return None
    return Path(checkpoint).parent.parent


def clip_config(cfg: DictConfig, vision_config: dict[str, Any]) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.metrics.clip, resolve=True) if cfg.metrics.clip else vision_config)


def build_clip_scorer(cfg: DictConfig, config: dict[str, Any]) -> tuple[ClipScorer | None, str | None]:
    from vgtrain.models.backbones import BackboneError

    try:
        return ClipScorer.from_vision_config(config, device=cfg.device), None
    except (BackboneError, OSError, ValueError, TypeError) as error:
        return (
            None,
            f"no CLIP model for CLIPScore ({error}); set metrics.clip to a vision config with weights",
        )


def decode_split(cfg: DictConfig, decoder: Any, urls: str, scorer: ClipScorer | None) -> dict[str, Any]:
    """Captions every image; keeps CLIP image embeddings and the first report.num_images images."""
    strategy, options = cfg.decode.strategy, OmegaConf.to_container(cfg.decode.options, resolve=True)
    counter = SkipCounter()
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    image_embeds: list[torch.Tensor] = []
    pending: list[Sample] = []

    def flush() -> None:
        images = [s.image for s in pending]
        results = decoder.caption(images, strategy, batch_size=cfg.batch_size, **options)
        if scorer is not None:
            image_embeds.append(scorer.embed_images(images))
        for sample, result in zip(pending, results, strict=True):
            rows.append(
                {
                    "key": sample.key,
                    "prediction": result.text,
                    "references": sample.references,
                    "score": result.score,
                }
            )
            if len(examples) < cfg.report.num_images:
                examples.append({**rows[-1], "image": image_data_uri(sample.image), "pil": sample.image})
        pending.clear()
        log.info("captioned %d images", len(rows))

    for sample in read_split(urls, cfg.limit, counter):
        pending.append(sample)
        if len(pending) == cfg.batch_size:
            flush()
    if pending:
        flush()
    if not rows:
        raise ShardNotFoundError(f"data.{cfg.split}_urls={urls}: no readable image with a caption")
    embeds = torch.cat(image_embeds) if image_embeds else None
    return {"rows": rows, "examples": examples, "image_embeds": embeds, "skipped_samples": counter.take()}


def score(
    cfg: DictConfig, decoded: dict[str, Any], scorer: ClipScorer | None, clip_problem: str | None
) -> MetricReport:
    rows = decoded["rows"]
    names = ["bleu", "rouge_l", "cider"] + [m for m in ("meteor", "spice") if cfg.metrics[m]]
    report = caption_metrics(
        {r["key"]: r["prediction"] for r in rows}, {r["key"]: r["references"] for r in rows}, metrics=names
    )
    for metric in ("meteor", "spice"):
        if not cfg.metrics[metric]:
            report.skip(metric, f"disabled (metrics.{metric}=false)")
    if not cfg.metrics.clipscore:
        clip_problem = "disabled (metrics.clipscore=false)"
    if scorer is None or clip_problem:
        for metric in ("clipscore", "refclipscore"):
            report.skip(metric, clip_problem or "no CLIP model")
    else:
        from vgtrain.metrics import clip_scores

        candidates = scorer.embed_texts([r["prediction"] for r in rows])
        references = list(
            torch.split(
                scorer.embed_texts([t for r in rows for t in r["references"]]),
                [len(r["references"]) for r in rows],
            )
        )
        clip_s, ref_s = clip_scores(decoded["image_embeds"], candidates, references)
        report.values["clipscore"], report.values["refclipscore"] = float(clip_s.mean()), float(ref_s.mean())
        for row, c, rc in zip(rows, clip_s.tolist(), ref_s.tolist(), strict=True):
            report.per_image[row["key"]].update(clipscore=c, refclipscore=rc)
    report.values = {key: report.values.get(key) for key in METRIC_KEYS}
    return report


def format_table(values: dict[str, float | None], notes: dict[str, str]) -> str:
    lines = ["metric          value", "-" * 22]
    for key, value in values.items():
        shown = f"{value:8.4f}" if value is not None else "    null"
        lines.append(f"{key:<14}{shown}" + (f"   ({notes[key]})" if key in notes else ""))
    return "\n".join(lines)


def log_results(cfg: DictConfig, report: MetricReport, decoded: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    values = {f"eval/{k}": v for k, v in report.values.items() if v is not None}
    for logger in instantiate_group(cfg.get("logger")):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(values, step=0)
        if isinstance(logger, WandbLogger):
            import wandb

            columns = ["key", "image", "prediction", "references"]
            data = [
                [e["key"], wandb.Image(e["pil"]), e["prediction"], " | ".join(e["references"])]
                for e in decoded["examples"]
            ]
            logger.experiment.log({"eval/examples": wandb.Table(columns=columns, data=data)})
            logger.experiment.finish()
        else:
            logger.save()


def run(cfg: DictConfig) -> dict[str, Any]:
    from vgtrain.decode.decoder import VisualDecoder
    from vgtrain.decode.strategies import get_strategy

    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    validate(cfg, EvalSchema)
    try:
        get_strategy(cfg.decode.strategy).resolve(
            dict(OmegaConf.to_container(cfg.decode.options, resolve=True))
        )
    except ValueError as error:
        raise ConfigError(f"decode: {error}") from None
    if cfg.data.get(f"{cfg.split}_urls") is None:
        prepare_synthetic_data(cfg)  # data=shapes: generate the demo's splits if needed
    urls = cfg.data.get(f"{cfg.split}_urls")
    if not urls:
        raise ConfigError(
            f"data.{cfg.split}_urls is not set; give the shards to evaluate, e.g. data.{cfg.split}_urls=/data/val-000000.tar"
        )
    try:
        manifest = read_manifest(cfg.export)
        decoder = VisualDecoder.from_export(cfg.export, device=cfg.device)
    except ArtifactError as error:
        raise ConfigError(f"export={cfg.export}: {error}") from None
    if cfg.get("task", "caption") == "vqa":
        return run_vqa(cfg, decoder, manifest, str(urls), out_dir, started)
    clip = clip_config(cfg, decoder.vision_config)
    scorer, clip_problem = build_clip_scorer(cfg, clip) if cfg.metrics.clipscore else (None, None)
    notes = {}
    if scorer is not None and clip.get("name") == "tiny" and not clip.get("pretrained"):
        notes["clipscore"] = notes["refclipscore"] = (
            "CLIP of the offline tiny backbone: random-init, so this measures nothing (set metrics.clip)"
        )

    decoded = decode_split(cfg, decoder, str(urls), scorer)
    report = score(cfg, decoded, scorer, clip_problem)
    rows = decoded["rows"]
    for row in rows:
        row["metrics"] = report.per_image.get(row["key"], {})
    for example in decoded["examples"]:
        example["metrics"] = report.per_image.get(example["key"], {})
    details = {
        "export": str(Path(cfg.export).resolve()),
        "data": str(urls),
        "num_images": len(rows),
        "decode": {
            "strategy": cfg.decode.strategy,
            **OmegaConf.to_container(cfg.decode.options, resolve=True),
        },
        "skipped_samples": decoded["skipped_samples"],
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    metrics = {**report.values, "skipped": report.skipped, "notes": notes, **details}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    history = training_history(
        Path(cfg.report.training_log) if cfg.report.training_log else None, training_run_dir(manifest)
    )
    page = render_report(
        title=f"vgtrain eval: {Path(cfg.export).name}",
        metrics=report.values,
        notes={**notes, **report.skipped},
        details=details,
        history=history,
        examples=decoded["examples"],
    )
    atomic_write_text(out_dir / "report.html", page)
    log_results(cfg, report, decoded)
    table = format_table(report.values, {**notes, **report.skipped})
    print(f"\n{len(rows)} images, decode={cfg.decode.strategy}\n{table}")
    print(f"\nrun directory:\n{out_dir}\n(predictions.jsonl, metrics.json, report.html)")
    return metrics


def run_vqa(
    cfg: DictConfig, decoder: Any, manifest: dict[str, Any], urls: str, out_dir: Path, started: float
) -> dict[str, Any]:
    """task=vqa: answers every assistant turn of the split's conversations (library:
    vgtrain/evaluation/vqa.py), scores VQA accuracy / exact match per question type."""
    from vgtrain.data.conversation_split import read_conversation_split
    from vgtrain.evaluation.vqa import answer_split, report_cards, summarize

    counter = SkipCounter()
    rows, examples = answer_split(
        decoder,
        read_conversation_split(urls, cfg.limit, counter),
        strategy=cfg.decode.strategy,
        options=dict(OmegaConf.to_container(cfg.decode.options, resolve=True)),
        batch_size=cfg.batch_size,
        keep_images=cfg.report.num_images,
    )
    metrics = summarize(rows)
    details = {
        "task": "vqa",
        "export": str(Path(cfg.export).resolve()),
        "data": urls,
        "decode": {
            "strategy": cfg.decode.strategy,
            **OmegaConf.to_container(cfg.decode.options, resolve=True),
        },
        "skipped_samples": counter.take(),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(out_dir / "metrics.json", json.dumps({**metrics, **details}, indent=2) + "\n")
    notes = {
        "vqa_accuracy": "min(#matching references / 3, 1) over leave-one-out subsets; one reference: exact match"
    }
    page = render_report(
        title=f"vgtrain eval (VQA): {Path(cfg.export).name}",
        metrics=metrics,
        notes=notes,
        details=details,
        history=training_history(
            Path(cfg.report.training_log) if cfg.report.training_log else None, training_run_dir(manifest)
        ),
        examples=report_cards(examples),
    )
    atomic_write_text(out_dir / "report.html", page)
    print(f"\n{len(rows)} answers, decode={cfg.decode.strategy}\n" + format_table(metrics, notes))
    print(f"\nrun directory:\n{out_dir}\n(predictions.jsonl, metrics.json, report.html)")
    return {**metrics, **details}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        with open_dict(cfg):  # data configs other than shapes lack the split's key: read as null
            cfg.data.setdefault(f"{cfg.split}_urls", None)
        run(cfg)
    except Exception as error:
        message = explain(error)
        if message is None:  # unexpected: Hydra reports it with the traceback
            raise
        raise UserExit(error, message) from error
