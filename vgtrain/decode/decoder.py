"""The standalone decoder: an export directory -> captions and answers for images.

Needs torch, transformers, open_clip and safetensors only (no lightning, hydra, wandb, webdataset).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vgtrain.decode.base import Candidate, DecodeInputs, Decoding, Result
from vgtrain.decode.clip_guidance import ClipGuide
from vgtrain.decode.images import ImageError, image_name, open_image
from vgtrain.decode.strategies import get_strategy
from vgtrain.export.artifact import (
    DEFAULT_QUESTION_TEMPLATE,
    TOKENIZER_DIR,
    ArtifactError,
    load_adapter,
    read_manifest,
    resolve_backbone_config,
)
from vgtrain.models import VisualPrefixLM, build_model
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.prefix_lm import prompt_token_ids

# Facts of a rebuilt backbone that must equal the export's; digests only for frozen backbones
# (a trained backbone's weights come from the adapter file instead).
CHECKED_FACTS = {
    "vision": ("name", "token_dim", "embed_dim", "num_tokens", "image_size", "weights_digest"),
    "llm": ("name", "hidden_size", "vocab_size", "weights_digest"),
}


class VisualDecoder:
    """Captions (or answers questions about) images with a visual-prefix LM."""

    def __init__(
        self,
        model: VisualPrefixLM,
        *,
        vision_config: dict[str, Any],
        prompt: str = "",
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        device: str | torch.device = "cpu",
        chat_config: dict[str, Any] | None = None,
    ) -> None:
        if "{q}" not in question_template:
            raise ValueError(f"question template {question_template!r} has no '{{q}}' for the question")
        self.model = model.to(device).eval()  # decoding runs under no_grad; gradients stay as they are
        self.vision_config = vision_config  # builds the matching CLIP text tower for guidance
        self.prompt = prompt
        self.question_template = question_template
        self.device = torch.device(device)
        # The conversation template trained with (`model.chat`; None: captions only), for chat().
        self.chat_config = chat_config
        self._clip: ClipGuide | None = None

    @classmethod
    def from_export(
        cls, path: str | Path, *, device: str | torch.device = "cpu", question_template: str | None = None
    ) -> VisualDecoder:
        """Rebuilds the backbones from their registry entries, refuses any that differ from the ones
        the export was trained with, and loads the adapter strictly."""
        export_dir = Path(path)
        manifest = read_manifest(export_dir)
        vision_config = resolve_backbone_config(manifest, "vision", export_dir)
        llm_config = resolve_backbone_config(manifest, "llm", export_dir)
        model = build_model(
            vision_config,
            llm_config,
            dict(manifest["mapper"] or {}),
            dict(manifest.get("xattn") or {}),
            dict(manifest.get("llm_adapter") or {}),
        )
        _check_backbones(export_dir, manifest, model)
        model.llm.tokenizer = _load_tokenizer(export_dir, model)
        _load_trainable(export_dir, model, load_adapter(export_dir, manifest))
        return cls(
            model,
            vision_config=vision_config,
            prompt=manifest.get("prompt", ""),
            question_template=question_template
            or manifest.get("question_template", DEFAULT_QUESTION_TEMPLATE),
            device=device,
            chat_config=manifest.get("chat"),
        )

    def chat(self, images: Any, messages: Any, strategy: str = "greedy", **options: Any) -> list[Result]:
        """Answers the last user turn of ``messages`` (one conversation for every image, or one
        per image) about each image; see :func:`vgtrain.decode.chat.chat`."""
        from vgtrain.decode.chat import chat

        return chat(self, images, messages, strategy, **options)

    @property
    def clip(self) -> ClipGuide:
        if self._clip is None:
            self._clip = ClipGuide.for_vision(self.vision_config, self.model.vision).to(self.device)
        return self._clip

    def prompts(
        self, count: int, question: str | Sequence[str] | None = None, prompt: str | None = None
    ) -> list[str]:
        """One prompt per image: the question template filled in, or the captioning prompt."""
        if question is None:
            return [self.prompt if prompt is None else prompt] * count
        questions = [question] * count if isinstance(question, str) else list(question)
        if len(questions) != count:
            raise ValueError(f"got {len(questions)} questions for {count} images")
        return [self.question_template.format(q=q) for q in questions]

    @torch.no_grad()
    def prepare_inputs(self, features: VisualFeatures, prompts: list[str]) -> DecodeInputs:
        """``[pad; prefix; prompt]`` per image, left-padded so every row ends where generation
        starts. The prompt tokens are laid out as in training (``prompt_token_ids``)."""
        llm, model = self.model.llm, self.model
        device = features.tokens.device
        ids = [prompt_token_ids(llm.tokenizer, p, model.prefix_length) for p in prompts]
        width = max(len(i) for i in ids)
        padded = torch.full((len(ids), width), llm.tokenizer.pad_token_id, dtype=torch.long, device=device)
        for row, row_ids in enumerate(ids):
            if row_ids:
                padded[row, width - len(row_ids) :] = torch.tensor(row_ids, device=device)
        text = llm.embed(padded)
        if model.mapper is not None:
            prefix = model.mapper(features).to(text.dtype)
        else:
            prefix = text.new_zeros(len(ids), 0, text.shape[-1])
        rows, masks = [], []
        for row, row_ids in enumerate(ids):
            pad = width - len(row_ids)
            rows.append(torch.cat([text[row, :pad], prefix[row], text[row, pad:]]))
            masks.append(torch.cat([torch.zeros(pad), torch.ones(prefix.shape[1] + len(row_ids))]))
        mask = torch.stack(masks).long().to(device)
        return DecodeInputs(embeds=torch.stack(rows), attention_mask=mask, image_embeds=features.pooled)

    @contextmanager
    def bind_memory(
        self, features: VisualFeatures, expand: int = 1, rows: Sequence[int] | None = None
    ) -> Iterator[None]:
        """Binds the visual memory that cross-attention layers read, repeated ``expand`` times per
        image (beams, samples, MAGIC candidates), for the duration of one generation call;
        ``rows`` picks some of the images (a per-image reference loop).
        Prefix-only adapters read the image through the prefix alone: nothing to bind."""
        if self.model.xattn is None:
            yield
            return
        if rows is not None:
            features = features.index_select(torch.tensor(list(rows), device=features.tokens.device))
        with torch.no_grad():
            memory = self.model.visual_memory(features)
        with self.model.xattn.bind(memory.repeat_interleave(expand, dim=0)):
            yield

    def decode(
        self, features: VisualFeatures, prompts: list[str], strategy: str = "greedy", **options: Any
    ) -> list[list[Candidate]]:
        """Ranked candidates per image from precomputed features (best first)."""
        job = Decoding(
            llm=self.model.llm,
            inputs=self.prepare_inputs(features, prompts),
            clip=lambda: self.clip,
            bind_memory=partial(self.bind_memory, features),
            xattn=self.model.xattn,
        )
        return get_strategy(strategy).decode(job, options)

    def caption(
        self,
        images: Sequence[Image.Image | str | Path],
        strategy: str = "greedy",
        *,
        question: str | Sequence[str] | None = None,
        prompt: str | None = None,
        batch_size: int = 16,
        **options: Any,
    ) -> list[Result]:
        """One :class:`Result` per image, in order. An image that cannot be read gets an error
        result naming its file; the others are still captioned."""
        get_strategy(strategy).resolve(options)  # a bad option fails before any work
        if question is not None and self.chat_config is not None:  # trained on conversations
            questions = [question] * len(images) if isinstance(question, str) else list(question)
            turns = [[{"role": "user", "content": q}] for q in questions]
            return self.chat(images, turns, strategy, **options)
        names = [image_name(image, i) for i, image in enumerate(images)]
        prompts = self.prompts(len(images), question, prompt)
        results: list[Result | None] = [None] * len(images)
        loaded: list[tuple[int, torch.Tensor]] = []
        for index, image in enumerate(images):
            try:
                loaded.append((index, self.model.vision.transform(open_image(image))))
            except ImageError as error:
                results[index] = Result("", None, [], names[index], error=str(error))
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            with torch.no_grad():
                features = self.model.vision.encode(
                    torch.stack([pixels for _, pixels in chunk]).to(self.device)
                )
            groups = self.decode(features, [prompts[i] for i, _ in chunk], strategy, **options)
            for (index, _), group in zip(chunk, groups, strict=True):
                results[index] = Result.best_of(group, names[index])
        return [result for result in results if result is not None]


def _check_backbones(export_dir: Path, manifest: dict[str, Any], model: VisualPrefixLM) -> None:
    for part, backbone in (("vision", model.vision), ("llm", model.llm)):
        saved, now = manifest["backbones"][part]["facts"], backbone.describe()
        for key in CHECKED_FACTS[part]:
            if key == "weights_digest" and backbone.trainable:
                continue
            if key in saved and saved[key] != now.get(key):
                raise ArtifactError(
                    f"{export_dir}: trained with {part} backbone {saved.get('name')!r} ({key}={saved[key]!r}, "
                    f"source {saved.get('source')}) but {part} backbone {now['name']!r} resolves here to "
                    f"{key}={now.get(key)!r} (source {now['source']}); refusing to decode with another backbone"
                )


def _load_tokenizer(export_dir: Path, model: VisualPrefixLM) -> Any:
    """The exported tokenizer, after checking it is the one the rebuilt LLM resolves to."""
    from transformers import AutoTokenizer

    folder = export_dir / TOKENIZER_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{folder}: cannot load the exported tokenizer ({error})") from error
    if tokenizer.get_vocab() != model.llm.tokenizer.get_vocab():
        raise ArtifactError(
            f"{folder}: the exported tokenizer ({len(tokenizer)} tokens) differs from the one LLM backbone "
            f"{model.llm.name!r} resolves to here ({len(model.llm.tokenizer)} tokens)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_trainable(export_dir: Path, model: VisualPrefixLM, tensors: dict[str, torch.Tensor]) -> None:
    """Strict: the adapter file must hold exactly the model's trainable tensors, with their shapes."""
    targets = model.trainable_state_dict()
    missing, unexpected = sorted(targets.keys() - tensors.keys()), sorted(tensors.keys() - targets.keys())
    misshapen = [k for k in targets.keys() & tensors.keys() if targets[k].shape != tensors[k].shape]
    if missing or unexpected or misshapen:
        raise ArtifactError(
            f"{export_dir}: adapter tensors do not fit the model rebuilt from vgtrain.json: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, other shape {sorted(misshapen)[:4]}"
        )
    parameters = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in tensors.items():
            parameters[key].copy_(value)
