"""The decoding interface: prepared inputs in, ranked candidates per image out."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from vgtrain.decode.clip_guidance import ClipGuide
from vgtrain.decode.lm import sequence_log_probs
from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.xattn import CrossAttentionAdapter


@dataclass
class DecodeInputs:
    embeds: torch.Tensor  # [B, L, D]: left padding, then the visual prefix, then the prompt
    attention_mask: torch.Tensor  # [B, L]: 0 on padding
    image_embeds: torch.Tensor  # [B, E]: CLIP image embeddings, for guidance and re-ranking


@dataclass
class Decoding:
    """What a strategy works with: the LM, the inputs, CLIP (built on first use) and the hook that
    binds a cross-attention memory for a forward pass, expanded ``n`` times per image."""

    llm: LanguageModel
    inputs: DecodeInputs
    clip: Callable[[], ClipGuide]
    bind_memory: Callable[..., AbstractContextManager[None]]  # (expand, rows=None)
    # The cross-attention layers bind_memory feeds: a decoding loop that runs the LM's blocks
    # itself (vgtrain.decode.static_lm) must run them too. None: a prefix-only model.
    xattn: CrossAttentionAdapter | None = None


@dataclass
class Candidate:
    tokens: list[int]  # generated tokens, without EOS and padding
    text: str
    score: float  # log p(tokens, then EOS if generated | image, prompt)
    clip_score: float | None = None  # CLIP logit of (image, text), when re-ranked


@dataclass
class Result:
    """One image's outcome: the best candidate, or ``error`` (naming the file) and empty text."""

    text: str
    score: float | None
    tokens: list[int]
    image: str = ""
    clip_score: float | None = None
    error: str | None = None
    candidates: list[Candidate] = field(default_factory=list)  # all returned sequences, best first

    @classmethod
    def best_of(cls, group: list[Candidate], image: str) -> Result:
        """An image's result from its candidates (best first); all of them kept when several."""
        best = group[0]
        return cls(
            best.text,
            best.score,
            best.tokens,
            image,
            best.clip_score,
            candidates=group if len(group) > 1 else [],
        )

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "caption": self.text,
            **{k: v for k, v in asdict(self).items() if k not in ("image", "text")},
        }


COMMON_OPTIONS: dict[str, Any] = {"max_new_tokens": 24, "min_new_tokens": 0}


class Strategy:
    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in; an option the strategy does not know is an error, not ignored."""
        known = {**COMMON_OPTIONS, **self.defaults}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"decoding strategy {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(sorted(known))}"
            )
        return {**known, **{k: v for k, v in options.items() if v is not None}}

    def decode(self, job: Decoding, options: dict[str, Any]) -> list[list[Candidate]]:
        raise NotImplementedError


def until_eos(row: list[int], eos: int) -> tuple[list[int], bool]:
    """The tokens before the first EOS, and whether EOS was generated."""
    return (row[: row.index(eos)], True) if eos in row else (row, False)


def cut_at_stop(text: str, stop_strings: list[str] | None) -> str:
    cuts = [text.find(s) for s in stop_strings or () if s and s in text]
    return text[: min(cuts)] if cuts else text


def finish(
    job: Decoding,
    rows: list[tuple[list[int], bool]],
    per_image: int,
    stop_strings: list[str] | None = None,
    rerank: str | None = None,
    sort_by_score: bool = False,
) -> list[list[Candidate]]:
    """Rows (``per_image`` consecutive rows per image) -> scored, ranked candidates per image."""
    if rerank not in (None, "clip"):
        raise ValueError(f"rerank must be None or 'clip', got {rerank!r}")
    tokenizer, eos = job.llm.tokenizer, job.llm.eos_token_id
    inputs = job.inputs
    with job.bind_memory(per_image):  # scoring reads the image as decoding did
        scores = sequence_log_probs(
            job.llm,
            inputs.embeds.repeat_interleave(per_image, 0),
            inputs.attention_mask.repeat_interleave(per_image, 0),
            [tokens + [eos] if ended else tokens for tokens, ended in rows],
        )
    texts = [
        cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings).strip()
        for tokens, _ in rows
    ]
    candidates = [
        Candidate(tokens, text, float(score))
        for (tokens, _), text, score in zip(rows, texts, scores, strict=True)
    ]
    groups = [candidates[i : i + per_image] for i in range(0, len(candidates), per_image)]
    if rerank == "clip":
        similarity = job.clip().similarity(inputs.image_embeds, [[c.text for c in group] for group in groups])
        for group, values in zip(groups, similarity.tolist(), strict=True):
            for candidate, value in zip(group, values, strict=True):
                candidate.clip_score = value
        return [sorted(group, key=lambda c: -c.clip_score) for group in groups]
    return [sorted(group, key=lambda c: -c.score) if sort_by_score else group for group in groups]
