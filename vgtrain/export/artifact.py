"""The export artifact's format, shared by its writer (vgtrain.export.writer) and reader (vgtrain.decode).

An export directory holds::

    adapter.safetensors   trainable tensors only (tied aliases stored once)
    vgtrain.json          format version, backbone entries and facts, adapter config, prompts, digests
    tokenizer/            the LLM's tokenizer files (the tiny one is trained offline: it must travel)
    backbones/            local backbone files (with --bundle-backbones) and the tiny tokenizer corpus
    README.md             a short model card

Pure torch + safetensors: no lightning, hydra, wandb or webdataset here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vgtrain.files import apply_umask

FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "vgtrain.json"
TOKENIZER_DIR = "tokenizer"
BUNDLE_DIR = "backbones"
CARD_FILE = "README.md"
DEFAULT_QUESTION_TEMPLATE = "Question: {q} Answer:"

# Config keys that may name local files, per backbone: these are digested, and bundled on request.
LOCAL_FILE_KEYS: dict[str, tuple[str, ...]] = {"vision": ("pretrained",), "llm": ("path", "tokenizer_corpus")}
# Small files without which a backbone cannot be rebuilt at all: always bundled.
ALWAYS_BUNDLED: frozenset[tuple[str, str]] = frozenset({("llm", "tokenizer_corpus")})


class ArtifactError(ValueError):
    """An export that cannot be written or read as asked; the message names the file or key."""


def path_digest(path: Path) -> str:
    """sha256 over a file's bytes, or over a folder's relative file names and bytes (sorted)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def config_digest(config: Any) -> str:
    """sha256 of a JSON-able config in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Reads ``vgtrain.json``; a missing, unparsable or newer-format manifest names the file."""
    path = Path(export_dir) / MANIFEST_FILE
    if not Path(export_dir).is_dir():
        raise ArtifactError(f"{export_dir}: not an export directory (it does not exist or is not a folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: cannot read the export manifest ({error})") from error
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is not one this vgtrain reads (up to {FORMAT_VERSION})"
        )
    for key in ("backbones", "adapter", "mapper", "tokenizer"):
        if key not in manifest:
            raise ArtifactError(f"{path}: missing key {key!r}")
    return manifest


def resolve_backbone_config(manifest: dict[str, Any], part: str, export_dir: Path) -> dict[str, Any]:
    """The config to rebuild a backbone with: bundled files replace the recorded paths. Either way
    the file must exist and still have the digest recorded at export."""
    entry = manifest["backbones"][part]
    config = dict(entry["config"])
    for key, record in entry.get("files", {}).items():
        bundled = record.get("bundled")
        location = export_dir / bundled if bundled else Path(record["path"])
        if not location.exists():
            hint = (
                "the export is incomplete"
                if bundled
                else "re-export with --bundle-backbones to carry it along"
            )
            raise ArtifactError(
                f"{export_dir / MANIFEST_FILE}: {part} backbone file {key}={str(location)!r} does not exist here; {hint}"
            )
        found = path_digest(location)
        if found != record["sha256"]:
            raise ArtifactError(
                f"{export_dir / MANIFEST_FILE}: {part} backbone file {location} has changed since export "
                f"(sha256 {found[:16]}..., recorded {record['sha256'][:16]}...)"
            )
        config[key] = str(location)  # absolute: a relative path in the config meant the training cwd
    return config


def record_files(part: str, config: dict[str, Any], out: Path, bundle: bool) -> dict[str, Any]:
    """Digests the local files a backbone config names; copies them under backbones/ when asked."""
    records: dict[str, Any] = {}
    for key in LOCAL_FILE_KEYS.get(part, ()):
        value = config.get(key)
        if not value or not Path(value).exists():
            continue  # a hub id, an open_clip tag, or unset: the registry resolves it
        source = Path(value).resolve()
        record: dict[str, Any] = {"path": str(source), "sha256": path_digest(source), "bundled": None}
        if bundle or (part, key) in ALWAYS_BUNDLED:
            relative = Path(BUNDLE_DIR) / part / key / source.name
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, out / relative)
            record["bundled"] = relative.as_posix()
        records[key] = record
    return records


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary sibling of ``target`` that is renamed into place only when complete."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ArtifactError(f"{target}: already exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        # mkdtemp and safetensors create private (0700/0600) entries; an export is meant to be
        # shared, so it gets the modes any file the user creates gets.
        apply_umask(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_adapter(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared or strided storage: every tensor gets its own contiguous copy.
    owned = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    save_file(owned, str(path), metadata={"format": "pt", "vgtrain_format_version": str(FORMAT_VERSION)})


def load_adapter(export_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter tensors under every name the model uses (tied aliases expanded again)."""
    path = export_dir / manifest["adapter"].get("file", ADAPTER_FILE)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ArtifactError(f"{path}: cannot read the adapter tensors ({error})") from error
    for alias, stored in manifest["adapter"].get("tied_aliases", {}).items():
        if stored not in tensors:
            raise ArtifactError(f"{path}: tied alias {alias!r} points at {stored!r}, which the file lacks")
        tensors[alias] = tensors[stored]
    return tensors


def model_card(manifest: dict[str, Any], staging: Path) -> str:
    vision, llm, adapter = manifest["backbones"]["vision"], manifest["backbones"]["llm"], manifest["adapter"]
    size_mb = (staging / ADAPTER_FILE).stat().st_size / 1e6
    llm_note = (
        "trained with the adapter: its weights are in the adapter file" if llm["trainable"] else "frozen"
    )
    bundled = sorted(
        f"{part}.{key}"
        for part, entry in manifest["backbones"].items()
        for key, record in entry["files"].items()
        if record["bundled"]
    )
    return f"""# vgtrain visual-prefix adapter

A `{manifest["mapper"]["name"]}` mapper turns image features into a prefix of {manifest["prefix_length"]} token embeddings for a language model; cross-attention: `{(manifest.get("xattn") or {}).get("name", "none")}`.

| part | registry entry | source | notes |
|---|---|---|---|
| vision | `{vision["registry_name"]}` | {vision["source"]} | frozen, weights digest `{vision["facts"].get("weights_digest")}` |
| LLM | `{llm["registry_name"]}` | {llm["source"]} | {llm_note}; hidden size {llm["facts"].get("hidden_size")} |
| adapter | `{adapter["file"]}` | this folder | {adapter["num_parameters"]:,} parameters, {size_mb:.2f} MB |

- Prompt: `{manifest["prompt"]!r}`; question template: `{manifest["question_template"]!r}`
- Trained for {manifest["checkpoint"]["global_step"]} steps; config digest `{manifest["training_config"]["digest"][:16]}`
- Bundled backbone files: {", ".join(bundled) or "none"}

Frozen backbones are not in this folder: the decoder rebuilds them from their registry entries and
refuses any whose facts differ from `vgtrain.json`.

```bash
vgtrain caption --export THIS_DIR image.jpg [--strategy beam --num-beams 5] [--question "..."]
```
```python
from vgtrain.decode import VisualDecoder
decoder = VisualDecoder.from_export("THIS_DIR")
print(decoder.caption(["image.jpg"])[0].text)
```
"""
