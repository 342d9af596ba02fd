"""Conversations -> token ids, with the image's place and the assistant tokens marked.

One renderer serves training (the collator), decoding (``VisualDecoder.chat``, ``vgtrain chat``,
``vgtrain caption --question``) and evaluation, so a prompt is laid out the same way everywhere.

Two kinds of template:

- the LLM tokenizer's own chat template (``tokenizer.chat_template``, e.g. SmolLM2's ChatML), used
  as it is: the text is rendered by the tokenizer, and the spans of the assistant turns are found by
  rendering growing prefixes of the conversation (``before`` = history + generation prompt,
  ``through`` = history + the assistant turn; the turn is the difference);
- a plain template for tokenizers without one (the tiny demo LLM, GPT-2, OPT): each user turn is
  ``user`` with ``{content}`` filled in, each assistant turn ``assistant`` then EOS. An empty user
  turn renders as nothing, so a caption with an empty prompt is laid out as captioning always was.

The image goes where ``<image>`` stands in a turn; where no turn has one, before the first user
turn's text (plain: at the very start, as in captioning; chat template: at the start of the first
user message, after its role header, as LLaVA does). One image per conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
IMAGE_PLACES = ("before", "after")
CHAT_KEYS = ("template", "plain", "system", "image_place")


class ConversationError(ValueError):
    """A conversation that cannot be rendered (bad roles, turn order, image markers)."""


@dataclass(frozen=True)
class PlainTemplate:
    user: str = "Q: {content} A:"
    assistant: str = " {content}"

    def __post_init__(self) -> None:
        for name in ("user", "assistant"):
            if "{content}" not in getattr(self, name):
                raise ConversationError(f"plain template {name}={getattr(self, name)!r} has no '{{content}}'")


@dataclass
class EncodedConversation:
    """Text token ids (the visual prefix is not among them), which of them carry loss (assistant
    tokens), and how many text tokens precede the visual prefix."""

    ids: list[int]
    loss_mask: list[bool]
    image_index: int

    def truncate(self, max_tokens: int) -> EncodedConversation:
        if len(self.ids) <= max_tokens:
            return self
        return EncodedConversation(
            self.ids[:max_tokens], self.loss_mask[:max_tokens], min(self.image_index, max_tokens)
        )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``{role, content}`` dicts (LLaVA's ``{from: human|gpt, value}`` accepted), checked: roles
    known, a system turn only first, user and assistant alternating from a user turn."""
    aliases = {"human": "user", "gpt": "assistant"}
    out: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = message.get("role", message.get("from"))
        role = aliases.get(str(role), role)
        content = message.get("content", message.get("value"))
        if role not in ROLES:
            raise ConversationError(f"turn {index}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"turn {index}: content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    body = out[1:] if out and out[0]["role"] == "system" else out
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConversationError(
                f"turns out of order: turn {index + len(out) - len(body)} is {message['role']!r}, "
                f"expected {expected!r} (a conversation alternates user, assistant, ... from a user turn)"
            )
    return out


def count_images(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_TOKEN) for m in messages)


class ConversationRenderer:
    """Renders conversations for one tokenizer. ``template``: ``auto`` (the tokenizer's chat
    template if it has one, else ``plain``), ``chat`` (the tokenizer's, required) or ``plain``.
    ``prefix_length``: the visual prefix's length; 0 (cross-attention only) starts plain
    sequences with BOS, so the first answer token is predicted from a position that sees the image.
    ``image_place``: where a conversation without an ``<image>`` marker gets its image: ``before``
    the first user turn (LLaVA's ``<image>\n{question}``) or ``after`` its text
    (``{question}\n<image>``), where the LLM reads the image already knowing the question."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str = "auto",
        plain: PlainTemplate | Mapping[str, str] | None = None,
        system: str | None = None,
        prefix_length: int = 0,
        image_place: str = "before",
    ) -> None:
        if image_place not in IMAGE_PLACES:
            raise ConversationError(f"image_place must be before or after, got {image_place!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template not in ("auto", "chat", "plain"):
            raise ConversationError(f"template must be auto, chat or plain, got {template!r}")
        if template == "chat" and not has_chat:
            raise ConversationError(
                "template=chat but the tokenizer has no chat_template; use template=plain (or auto)"
            )
        self.tokenizer = tokenizer
        self.use_chat = template == "chat" or (template == "auto" and has_chat)
        self.plain = plain if isinstance(plain, PlainTemplate) else PlainTemplate(**(plain or {}))
        self.system = system
        self.prefix_length = prefix_length
        self.image_place = image_place

    @classmethod
    def from_config(
        cls, tokenizer: PreTrainedTokenizerBase, chat: Mapping[str, Any] | None, prefix_length: int
    ) -> ConversationRenderer:
        """The renderer a ``model.chat`` block asks for (null: the tokenizer's chat template, or
        the plain one); keys: template, plain, system, image_place."""
        chat = dict(chat or {})
        unknown = sorted(set(chat) - set(CHAT_KEYS))
        if unknown:
            raise ConversationError(
                f"model.chat has no key {', '.join(unknown)}; it takes {', '.join(CHAT_KEYS)}"
            )
        return cls(
            tokenizer,
            template=chat.get("template") or "auto",
            plain=chat.get("plain"),
            system=chat.get("system"),
            prefix_length=prefix_length,
            image_place=chat.get("image_place") or "before",
        )

    @property
    def kind(self) -> str:
        return "chat" if self.use_chat else "plain"

    def encode(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> EncodedConversation:
        """The whole conversation; with ``add_generation_prompt`` it must end on a user turn and
        the ids end where the assistant's answer starts."""
        turns = normalize_messages(messages)
        if self.system and not (turns and turns[0]["role"] == "system"):
            turns = [{"role": "system", "content": self.system}, *turns]
        if not any(t["role"] == "user" for t in turns):
            raise ConversationError("a conversation needs at least one user turn")
        last = turns[-1]["role"]
        if add_generation_prompt and last != "user":
            raise ConversationError("to generate an answer the conversation must end on a user turn")
        images = count_images(turns)
        if images > 1:
            raise ConversationError(f"the conversation has {images} '{IMAGE_TOKEN}' markers; one image only")
        if images == 0 and self.image_place == "after":
            first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
            turns = [dict(t) for t in turns]
            turns[first_user]["content"] = f"{turns[first_user]['content']}\n{IMAGE_TOKEN}"
            images = 1
        segments = (
            self._chat_segments(turns, add_generation_prompt, images == 0)
            if self.use_chat
            else self._plain_segments(turns, images == 0)
        )
        return self._tokenize(segments)

    def encode_caption(self, prompt: str, caption: str) -> EncodedConversation:
        """A caption as a one-turn conversation: the prompt as the user turn, the caption as the
        answer (plain: ``[prompt][caption][EOS]``, exactly the captioning layout)."""
        if not self.use_chat:
            segments: list[tuple[str, Any]] = [("image", None)]
            if prompt:
                segments.append(("text", prompt))
            segments += [("answer", caption), ("eos", None)]
            return self._tokenize(segments)
        return self.encode([{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}])

    # -- rendering -------------------------------------------------------------------------------

    def _plain_segments(self, turns: list[dict[str, str]], default_image: bool) -> list[tuple[str, Any]]:
        segments: list[tuple[str, Any]] = [("image", None)] if default_image else []
        for turn in turns:
            if turn["role"] == "assistant":
                text = self.plain.assistant.format(content=turn["content"])
                segments += [("answer", text), ("eos", None)]
            elif turn["content"]:  # system and user; an empty user turn renders as nothing
                text = turn["content"] if turn["role"] == "system" else self.plain.user.format(**turn)
                segments += _split_image("text", text)
        return segments

    def _render(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chat_segments(
        self, turns: list[dict[str, str]], generation_prompt: bool, default_image: bool
    ) -> list[tuple[str, Any]]:
        if default_image:
            first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
            turns = [dict(t) for t in turns]
            turns[first_user]["content"] = f"{IMAGE_TOKEN}\n{turns[first_user]['content']}"
        full = self._render(turns, generation_prompt)
        spans: list[tuple[int, int]] = []
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._render(turns[:index], True)
            through = self._render(turns[: index + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ConversationError(
                    "the tokenizer's chat template renders a conversation's prefix differently from the "
                    "whole conversation, so assistant turns cannot be located; use template=plain"
                )
            # The answer and the template's end-of-turn marker carry loss; trailing newlines do not.
            end = len(through.rstrip())
            spans.append((len(before), max(end, len(before))))
        segments: list[tuple[str, Any]] = []
        cursor = 0
        for start, end in spans:
            segments += _split_image("text", full[cursor:start])
            segments += _split_image("answer", full[start:end])
            cursor = end
        segments += _split_image("text", full[cursor:])
        return segments

    def _tokenize(self, segments: list[tuple[str, Any]]) -> EncodedConversation:
        # Segment by segment, so the boundaries between prompt, image and answer are token
        # boundaries, the same ones at generation time (a prompt ends where an answer starts).
        ids: list[int] = []
        loss: list[bool] = []
        image_index: int | None = None
        tokenizer = self.tokenizer
        if not self.use_chat and self.prefix_length == 0:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids.append(bos)
            loss.append(False)
        for kind, text in segments:
            if kind == "image":
                image_index = len(ids)
                continue
            if kind == "eos":
                piece = [tokenizer.eos_token_id]
            elif not text:
                continue
            else:
                piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            loss += [kind in ("answer", "eos")] * len(piece)
        if image_index is None:  # unreachable: every path places the image once
            raise ConversationError("no image position in the conversation")
        return EncodedConversation(ids, loss, image_index)


def _split_image(kind: str, text: str) -> list[tuple[str, Any]]:
    """``text`` as segments of ``kind``, with an image segment where ``<image>`` stands."""
    if IMAGE_TOKEN not in text:
        return [(kind, text)]
    head, tail = text.split(IMAGE_TOKEN, 1)
    return [(kind, head), ("image", None), (kind, tail)]


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and the end-of-turn tokens a chat template closes an answer with (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``, ...): generation stops at any of them."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return sorted({int(i) for i in ids if i is not None})
