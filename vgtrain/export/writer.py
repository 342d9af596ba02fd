"""A Lightning checkpoint -> a small, self-describing export (the library under `vgtrain export`).

The checkpoint already holds only the trainable tensors (``model.``-prefixed), the config they were
trained with (``hyper_parameters``) and the backbones' facts (``vgtrain``). Export checks the tensors
against a model rebuilt from that config, stores them once each, records where every backbone comes
from, and writes the directory atomically. No lightning, hydra, wandb or webdataset: it reads the
checkpoint as plain tensors (``weights_only=True``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vgtrain.export.artifact import (
    ADAPTER_FILE,
    CARD_FILE,
    DEFAULT_QUESTION_TEMPLATE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_DIR,
    ArtifactError,
    atomic_directory,
    config_digest,
    model_card,
    path_digest,
    record_files,
    save_adapter,
)
from vgtrain.models import add_llm_adapter, build_cross_attention
from vgtrain.models.backbones import BackboneError, build_llm, build_vision
from vgtrain.models.backbones.registry import build_llm_tokenizer
from vgtrain.models.lora import merge_lora
from vgtrain.models.mapper import build_mapper


class ExportError(ArtifactError):
    """A checkpoint that cannot be exported; the message names the file and what is wrong."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ExportError(f"{path}: no such checkpoint file") from error
    except Exception as error:  # torch raises pickle, zip and runtime errors alike for a bad file
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ExportError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ExportError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    for key in ("state_dict", "hyper_parameters", "vgtrain"):
        if key not in checkpoint:
            raise ExportError(f"{path}: not a vgtrain checkpoint: it has no {key!r} entry")
    for key in ("vision", "llm", "mapper"):
        if key not in checkpoint["hyper_parameters"]:
            raise ExportError(
                f"{path}: hyper_parameters lack {key!r}; cannot tell which model the tensors belong to"
            )
    return checkpoint


def expected_parameters(
    hparams: dict[str, Any], facts: dict[str, Any]
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Module]]:
    """Trainable parameters of the model the config describes, by state-dict name (aliases share an
    object), and the parts built: the adapters (mapper, cross-attention and its memory), and the
    LLM and vision tower only when trained or needed. Adapters are sized from the recorded backbone
    facts, so a frozen backbone is loaded only where cross-attention must find its layer stack."""
    parts: dict[str, nn.Module] = {}
    mapper_options = dict(hparams.get("mapper") or {"name": "none"})
    name = mapper_options.pop("name")
    if name != "none":
        parts["mapper"] = build_mapper(
            name,
            vision_token_dim=facts["vision"]["token_dim"],
            vision_embed_dim=facts["vision"]["embed_dim"],
            vision_num_tokens=facts["vision"]["num_tokens"],
            out_dim=facts["llm"]["hidden_size"],
            **mapper_options,
        )
    xattn = hparams.get("xattn") or {"name": "none"}
    lora = (hparams.get("llm_adapter") or {"name": "none"}).get("name", "none") != "none"
    trained_llm = bool(hparams["llm"].get("trainable")) or lora
    llm = build_llm(**hparams["llm"]) if trained_llm or xattn["name"] != "none" else None
    if llm is not None:
        add_llm_adapter(llm, hparams.get("llm_adapter"))  # LoRA first, as build_model does
    if llm is not None and trained_llm:
        parts["llm"] = llm  # LoRA: only its tensors are trainable, hence expected
    if xattn["name"] != "none":
        vision_facts = SimpleNamespace(
            token_dim=facts["vision"]["token_dim"], num_tokens=facts["vision"]["num_tokens"]
        )
        parts["xattn"], memory = build_cross_attention(xattn, vision_facts, llm)
        if memory is not None:
            parts["memory"] = memory
    if hparams["vision"].get("trainable"):
        parts["vision"] = build_vision(**hparams["vision"])
    expected = {
        f"{prefix}.{key}": value
        for prefix, module in parts.items()
        for key, value in module.state_dict(keep_vars=True).items()
        if isinstance(value, nn.Parameter) and value.requires_grad
    }
    return expected, parts


def check_adapter(
    path: Path, state: dict[str, torch.Tensor], expected: dict[str, nn.Parameter], mapper: str
) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(state.keys() & expected.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape checkpoint vs config", misshapen),
        )
        if items
    ]
    if problems:
        raise ExportError(
            f"{path}: the adapter tensors do not match the config the checkpoint records (mapper {mapper!r}); "
            + "; ".join(problems)
        )


def fill_tied_names(
    state: dict[str, torch.Tensor], expected: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """A checkpoint may keep a tied tensor under one of its names only (older vgtrain versions
    did): the other names of the group are filled in from it, so only truly missing tensors fail."""
    groups: dict[int, list[str]] = {}
    for key, parameter in expected.items():
        groups.setdefault(id(parameter), []).append(key)
    filled = dict(state)
    for names in groups.values():
        present = [name for name in names if name in state]
        for name in names:
            if present and name not in filled:
                filled[name] = state[present[0]]
    return filled


def deduplicate_tied(
    path: Path, state: dict[str, torch.Tensor], expected: dict[str, nn.Parameter]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stores each tied group once, under its first state-dict name (GPT-2: ``wte`` before
    ``lm_head``); returns the tensors and ``{alias: stored name}``. Ties come from the rebuilt
    model, so a checkpoint that saved two copies is handled like one that shared storage."""
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, parameter in expected.items():  # state-dict order
        first = owner.setdefault(id(parameter), key)
        if first != key:
            if not torch.equal(state[first], state[key]):
                raise ExportError(f"{path}: tied tensors {first!r} and {key!r} hold different values")
            aliases[key] = first
    return {key: value for key, value in state.items() if key not in aliases}, aliases


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    bundle_backbones: bool = False,
    overwrite: bool = False,
    merge_lora: bool = False,
) -> Path:
    """Writes the export artifact for ``checkpoint_path`` into ``out_dir``; returns ``out_dir``.
    ``merge_lora``: fold a LoRA-trained LLM's LoRA into its weights and bundle that LLM folder
    (the export then holds a whole LLM, and its adapter file no LoRA tensors)."""
    path, out = Path(checkpoint_path), Path(out_dir)
    checkpoint = read_checkpoint(path)
    hparams, facts = checkpoint["hyper_parameters"], checkpoint["vgtrain"]
    state = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    try:
        expected, parts = expected_parameters(hparams, facts)
    except (BackboneError, TypeError, ValueError, KeyError) as error:
        raise ExportError(
            f"{path}: cannot rebuild the adapter from the config it records ({error})"
        ) from error
    state = fill_tied_names(state, expected)
    check_adapter(path, state, expected, (hparams["mapper"] or {}).get("name", "none"))
    tensors, aliases = deduplicate_tied(path, state, expected)
    llm = parts.get("llm")
    tokenizer = llm.tokenizer if llm is not None else build_llm_tokenizer(**hparams["llm"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as LanguageModel does: EOS pads, masked out
    merged_dir = tempfile.TemporaryDirectory(prefix="vgtrain-merged-llm-") if merge_lora else None
    if merged_dir is not None:
        checkpoint, tensors = merged_lora_checkpoint(path, checkpoint, tensors, llm, Path(merged_dir.name))
        bundle_backbones = True  # the merged LLM exists nowhere else
    with atomic_directory(out, overwrite) as staging:
        save_adapter(staging / ADAPTER_FILE, tensors)
        tokenizer.save_pretrained(staging / TOKENIZER_DIR)
        manifest = build_manifest(
            path,
            checkpoint,
            tensors,
            aliases,
            tokenizer,
            parts["mapper"].prefix_length if "mapper" in parts else 0,
            staging,
            bundle_backbones,
        )
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (staging / CARD_FILE).write_text(model_card(manifest, staging), encoding="utf-8")
    if merged_dir is not None:
        merged_dir.cleanup()
    return out


def merged_lora_checkpoint(
    path: Path,
    checkpoint: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    llm: Any,
    folder: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Loads the LoRA tensors into ``llm``, merges them, saves the LLM to ``folder``, and returns
    the checkpoint as if trained on that frozen LLM (path set, no LLM adapter) and the adapter
    tensors without LoRA."""
    hparams = checkpoint["hyper_parameters"]
    if llm is None or (hparams.get("llm_adapter") or {}).get("name", "none") != "lora":
        raise ExportError(f"{path}: --merge-lora needs a checkpoint trained with model/llm_adapter=lora")
    lora = {key: value for key, value in tensors.items() if "lora_" in key}
    with torch.no_grad():
        for key, value in lora.items():
            llm.get_parameter(key.removeprefix("llm.")).copy_(value)
    merge_lora(llm.model)
    llm.model.save_pretrained(folder, safe_serialization=True)
    llm.tokenizer.save_pretrained(folder)
    merged = {
        **checkpoint,
        "hyper_parameters": {
            **hparams,
            "llm": {**hparams["llm"], "path": str(folder)},
            "llm_adapter": {"name": "none"},
        },
        "vgtrain": {**checkpoint["vgtrain"], "llm": {**llm.describe(), "source": str(folder)}},
    }
    return merged, {key: value for key, value in tensors.items() if key not in lora}


def build_manifest(
    path: Path,
    checkpoint: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    tokenizer: Any,
    prefix_length: int,
    staging: Path,
    bundle: bool,
) -> dict[str, Any]:
    hparams, facts = checkpoint["hyper_parameters"], checkpoint["vgtrain"]
    hydra_config = path.resolve().parent.parent / ".hydra" / "config.yaml"
    backbones = {
        part: {
            "registry_name": hparams[part]["name"],
            "config": hparams[part],
            "source": facts[part].get("source"),
            "trainable": bool(hparams[part].get("trainable", False)),
            "facts": facts[part],
            "files": record_files(part, hparams[part], staging, bundle),
        }
        for part in ("vision", "llm")
    }
    return {
        "format_version": FORMAT_VERSION,
        "backbones": backbones,
        "mapper": hparams["mapper"] or {"name": "none"},
        "xattn": hparams.get("xattn") or {"name": "none"},
        # LoRA on the LLM: its tensors are in the adapter file, under llm.model.*.lora_*.
        "llm_adapter": hparams.get("llm_adapter") or {"name": "none"},
        # How conversations were rendered in training (null: captions only); chat and questions reuse it.
        "chat": hparams.get("chat"),
        "prefix_length": int(prefix_length),
        "prompt": hparams.get("prompt", "") or "",
        "question_template": hparams.get("question_template", DEFAULT_QUESTION_TEMPLATE),
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "class": type(tokenizer).__name__,
            "size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        },
        "adapter": {
            "file": ADAPTER_FILE,
            "num_tensors": len(tensors),
            "num_parameters": sum(t.numel() for t in tensors.values()),
            "includes_llm": any(key.startswith("llm.") and "lora_" not in key for key in tensors),
            "includes_lora": any("lora_" in key for key in tensors),
            "tied_aliases": aliases,
        },
        "training_config": {
            "digest": config_digest(hparams),
            "hyper_parameters": hparams,
            "hydra_config": {"path": str(hydra_config), "sha256": path_digest(hydra_config)}
            if hydra_config.is_file()
            else None,
        },
        "checkpoint": {
            "path": str(path.resolve()),
            "sha256": path_digest(path),
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
        },
    }
