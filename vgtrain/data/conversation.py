"""Conversation samples: ``{key}.json`` with ``conversations``, drawing one per visit, and the
collator that renders them (see vgtrain/models/chat_template.py for the layout).

A sample's ``.json`` may hold ``"conversations"``: a list of ``{role: user|assistant, content}``
turns (LLaVA's ``{from: human|gpt, value}`` also read), or a list of such lists (several
conversations about the same image; training draws one per visit, evaluation scores all). An
assistant turn may carry ``"answers"`` (reference answers, e.g. VQAv2's ten) and ``"type"`` (a
question type for per-type accuracy). A sample with a caption only is a one-turn conversation
with the configured prompt; ``data.mix.caption`` is the share of visits that train on the caption
of a sample that has both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vgtrain.data.packing import pack_encoded
from vgtrain.models.chat_template import (
    IMAGE_TOKEN,
    ConversationError,
    ConversationRenderer,
    EncodedConversation,
    normalize_messages,
)
from vgtrain.models.grounding import GroundingTargets

IGNORE_INDEX = -100
Conversation = list[dict[str, Any]]


def read_conversations(raw: Any) -> list[Conversation]:
    """The conversations of a sample's ``.json`` (bytes, text or parsed); [] when it has none.
    Raises :class:`ConversationError` naming what is wrong with a malformed one."""
    if raw is None:
        return []
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []  # not JSON: no conversation (the caption, if any, stands)
    listed = raw.get("conversations") if isinstance(raw, dict) else None
    if not listed:
        return []
    if not isinstance(listed, list):
        raise ConversationError("'conversations' must be a list of turns or of conversations")
    conversations = listed if all(isinstance(item, list) for item in listed) else [listed]
    for conversation in conversations:
        check_conversation(conversation)
    return conversations


def check_conversation(conversation: Sequence[dict[str, Any]]) -> None:
    """Roles and order as :func:`normalize_messages` wants them, and a non-empty answer."""
    turns = normalize_messages(conversation)
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    if not answers:
        raise ConversationError("no assistant turn")
    if not all(answer.strip() for answer in answers):
        raise ConversationError("empty answer")


def references(turn: dict[str, Any]) -> list[str]:
    """Reference answers of an assistant turn: its ``answers`` list, else its content."""
    listed = [a for a in turn.get("answers") or [] if isinstance(a, str) and a.strip()]
    return listed or [str(turn.get("content", turn.get("value", "")))]


Visit = tuple[int, ...]
"""What one training visit of a sample reads: the indices of its conversations, in order (joined
into one when several); ``()`` is the caption."""


class ConversationPicker:
    """Which text a training visit uses: the sample's conversations or (with probability
    ``caption_share``, when the sample has a caption) the caption. With ``seed=None``
    (evaluation) always the first conversation. The RNG is made in the process that uses it.

    ``per_visit`` > 1 joins that many of the sample's conversations (drawn without replacement,
    in random order) into one multi-turn conversation, as LLaVA's multi-turn samples: the image
    is encoded once and every answer is supervised, instead of one or two tokens a visit.

    Streamed samples are drawn for here, one by one; cached training data is drawn for by its
    sampler (:class:`~vgtrain.training.visit_sampler.VisitSampler`) with :meth:`choose`, so that
    it knows each visit's length before it batches them."""

    def __init__(self, seed: int | None, caption_share: float = 0.0, per_visit: int = 1) -> None:
        if not 0.0 <= caption_share <= 1.0:
            raise ValueError(f"data.mix.caption must be within [0, 1], got {caption_share}")
        if per_visit < 1:
            raise ValueError(f"data.conversations_per_visit must be >= 1, got {per_visit}")
        self.seed = seed
        self.caption_share = caption_share
        self.per_visit = per_visit
        self._rng: random.Random | None = None

    def __call__(self, conversations: list[Conversation], has_caption: bool) -> Conversation | None:
        if not conversations:
            return None
        if self.seed is None:
            return conversations[0]
        if self._rng is None:
            info = torch.utils.data.get_worker_info()  # one stream per DataLoader worker
            self._rng = random.Random(f"{self.seed}:{info.id if info else -1}")
        return visit_conversation(conversations, self.choose(self._rng, len(conversations), has_caption))

    def choose(self, rng: random.Random, count: int, has_caption: bool) -> Visit:
        """A visit of a sample with ``count`` conversations, drawn with ``rng``."""
        if count == 0:
            return ()
        if has_caption and self.caption_share > 0 and rng.random() < self.caption_share:
            return ()
        if self.per_visit == 1 or count == 1:
            return (rng.randrange(count),)
        return tuple(rng.sample(range(count), min(self.per_visit, count)))


def visit_conversation(conversations: Sequence[Conversation], visit: Visit) -> Conversation | None:
    """The conversation a visit trains on (None: the caption)."""
    if not visit:
        return None
    if len(visit) == 1:
        return conversations[visit[0]]
    return join_conversations([conversations[i] for i in visit])


def visit_length(caption: str, conversations: Sequence[Conversation], visit: Visit) -> int:
    """A visit's text length in characters: a cheap stand-in for its token count (what
    length-grouped batching sorts by), counting each turn's template as a few characters."""
    if not visit:
        return len(caption)
    turns = [turn for i in visit for turn in conversations[i]]
    return sum(len(str(turn.get("content", turn.get("value", "")))) + 8 for turn in turns)


def join_conversations(conversations: Sequence[Conversation]) -> Conversation:
    """One conversation of several about the same image: the first keeps its system turn and
    ``<image>`` marker; later ones lose theirs (one system turn first, one image)."""
    joined: Conversation = list(conversations[0])
    for conversation in conversations[1:]:
        for turn in conversation:
            if turn.get("role", turn.get("from")) == "system":
                continue
            key = "content" if "content" in turn else "value"
            text = str(turn.get(key, ""))
            if IMAGE_TOKEN in text:
                turn = {**turn, key: text.replace(IMAGE_TOKEN, "").strip()}
            joined.append(turn)
    return joined


def attach_conversations(decoded: dict[str, Any], raw_json: Any, *, pin_first: bool) -> dict[str, Any]:
    """Adds ``conversations`` (all) to a decoded sample, and with ``pin_first`` (evaluation)
    ``conversation``: the first one. Training leaves the draw to the collator's picker, which
    does it alike for streamed and cached samples. Raises :class:`ConversationError`."""
    conversations = read_conversations(raw_json)
    if conversations:
        decoded["conversations"] = conversations
        if pin_first:
            decoded["conversation"] = conversations[0]
    return decoded


# With grounding on, this many samples without one region mean the data has none (an error).
GROUNDING_CHECK_SAMPLES = 256


class ConversationCollator:
    """Renders each sample's conversation (or caption) and right-pads the batch.

    ``labels`` spans ``prefix_length + text_length`` positions laid out as the model lays out its
    input: text before the image, the visual prefix, the rest. Only assistant tokens (answers and
    their end-of-turn/EOS) carry a label; ``image_position`` is each row's count of text tokens
    before the prefix. A sample whose ``conversation`` was not drawn yet (cached features) is
    drawn here with ``picker``. With ``pack_length`` > 0 the samples share rows of that many
    positions instead (vgtrain/data/packing.py): same samples, same loss, less padding.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        renderer: ConversationRenderer,
        prefix_length: int,
        prompt: str = "",
        max_tokens: int = 128,
        picker: ConversationPicker | None = None,
        pack_length: int = 0,
        grounding: GroundingTargets | None = None,
    ) -> None:
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token to build batches")
        if pack_length < 0:
            raise ValueError(f"data.pack_length must be >= 0 (0: no packing), got {pack_length}")
        if grounding is not None and pack_length:
            raise ValueError("model.grounding reads each row's prefix by grid cell: use data.pack_length=0")
        self.grounding = grounding
        self._grounding_seen = [0, 0]  # samples collated, of them with regions
        self.pack_length = pack_length
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.prefix_length = prefix_length
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.picker = picker or ConversationPicker(None)

    def encode(self, sample: dict[str, Any]) -> EncodedConversation:
        if "conversation" in sample:
            conversation = sample["conversation"]
        else:
            conversation = self.picker(sample.get("conversations") or [], bool(sample.get("caption")))
        if conversation is None:
            encoded = self.renderer.encode_caption(self.prompt, sample["caption"])
        else:
            encoded = self.renderer.encode(conversation)
        return encoded.truncate(self.max_tokens)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [self.encode(sample) for sample in samples]
        if self.pack_length:
            batch = pack_encoded(encoded, self.prefix_length, self.pack_length, self.tokenizer.pad_token_id)
        else:
            batch = self.padded(encoded)
        batch["image_position"] = torch.tensor([e.image_index for e in encoded], dtype=torch.long)
        batch["captions"] = [sample.get("caption", "") for sample in samples]
        batch["keys"] = [sample.get("key") for sample in samples]
        batch["conversations"] = [sample.get("conversations") or [] for sample in samples]
        if any("regions" in sample for sample in samples):
            batch["regions"] = [sample.get("regions") or [] for sample in samples]
        if self.grounding is not None:
            batch["grounding_targets"] = self.grounding_targets(samples)
        if any("references" in sample for sample in samples):
            batch["references"] = [
                sample.get("references", [sample.get("caption", "")]) for sample in samples
            ]
        if "image" in samples[0]:
            batch["pixel_values"] = torch.stack([sample["image"] for sample in samples])
        if "tokens" in samples[0]:
            batch["visual_tokens"] = torch.stack([sample["tokens"] for sample in samples])
            batch["visual_pooled"] = torch.stack([sample["pooled"] for sample in samples])
        return batch

    def grounding_targets(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        """[batch, prefix, k] token ids of each sample's regions (see models/grounding.py)."""
        assert self.grounding is not None
        self._grounding_seen[0] += len(samples)
        self._grounding_seen[1] += sum(bool(sample.get("regions")) for sample in samples)
        if self._grounding_seen[0] >= GROUNDING_CHECK_SAMPLES and not self._grounding_seen[1]:
            raise ValueError(
                f"model.grounding.weight > 0, but none of the first {self._grounding_seen[0]} samples "
                f'(e.g. {samples[0].get("key")}) has "regions" in its .json: add them (README, '
                '"Grounding loss") or set model.grounding.weight=0'
            )
        return torch.stack([self.grounding(sample.get("regions") or []) for sample in samples])

    def padded(self, encoded: list[EncodedConversation]) -> dict[str, Any]:
        """One sample per row, right-padded to the longest."""
        length = max(len(e.ids) for e in encoded)
        rows, prefix = len(encoded), self.prefix_length
        input_ids = torch.full((rows, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        labels = torch.full((rows, prefix + length), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(encoded):
            ids = torch.tensor(item.ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            # Text token j sits at position j before the image, j + prefix after it.
            positions = torch.arange(len(ids))
            positions = torch.where(positions < item.image_index, positions, positions + prefix)
            keep = torch.tensor(item.loss_mask, dtype=torch.bool)
            labels[row, positions[keep]] = ids[keep]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def conversation_collator(
    tokenizer: PreTrainedTokenizerBase,
    prefix_length: int,
    chat: dict[str, Any],
    *,
    prompt: str = "",
    max_tokens: int = 128,
    seed: int | None = 0,
    caption_share: float = 0.0,
    conversations_per_visit: int = 1,
    pack_length: int = 0,
    grounding: GroundingTargets | None = None,
) -> ConversationCollator:
    """The collator a ``model.chat`` config block asks for (see :meth:`ConversationRenderer.from_config`)."""
    renderer = ConversationRenderer.from_config(tokenizer, chat, prefix_length)
    return ConversationCollator(
        tokenizer,
        renderer,
        prefix_length,
        prompt=prompt,
        max_tokens=max_tokens,
        picker=ConversationPicker(seed, caption_share, conversations_per_visit),
        pack_length=pack_length,
        grounding=grounding,
    )
