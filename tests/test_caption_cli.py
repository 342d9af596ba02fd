"""`vgtrain caption`'s prompt and decoding flags change what the model sees and what it returns.

Through the command's ``main`` on a tiny export whose LLM was trained long enough to write
shapes captions and end them (EOS), so that repetition and length have something to act on."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY_LLM
from tests.tiny_checkpoints import heldout_images, train_tiny
from vgtrain.cli.caption import main as caption_main
from vgtrain.decode import VisualDecoder
from vgtrain.export.artifact import DEFAULT_QUESTION_TEMPLATE
from vgtrain.export.writer import export_checkpoint

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(shapes_dir, tmp_path_factory) -> Path:
    trained = train_tiny(
        tmp_path_factory.getbasetemp(),
        shapes_dir,
        "caption-cli",
        llm={**TINY_LLM, "trainable": True},
        steps=25,
    )
    return export_checkpoint(trained.checkpoint, tmp_path_factory.mktemp("caption_cli") / "export")


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory) -> list[Path]:
    return heldout_images(shapes_dir, tmp_path_factory.mktemp("caption_cli_images"), count=3)


class SeenTokens:
    """Every token id the decoder's LLM embeds (prompt and generated), one list per row and call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[list[int]]] = []
        from_export = VisualDecoder.from_export.__func__

        def wrapped(cls, *args: Any, **kwargs: Any) -> VisualDecoder:
            decoder = from_export(cls, *args, **kwargs)
            embeddings = decoder.model.llm.model.get_input_embeddings()
            embeddings.register_forward_hook(lambda _m, inputs, _o: self.seen(inputs[0]))
            return decoder

        monkeypatch.setattr(VisualDecoder, "from_export", classmethod(wrapped))

    def seen(self, ids: torch.Tensor) -> None:
        # [rows, tokens], or [rows] when a cached loop embeds one new token per row
        self.calls.append((ids if ids.dim() > 1 else ids.unsqueeze(-1)).tolist())

    def contains(self, ids: list[int]) -> bool:
        """Whether some embedded row holds ``ids`` as a contiguous run."""
        n = len(ids)
        return any(
            row[i : i + n] == ids for call in self.calls for row in call for i in range(len(row) - n + 1)
        )


def caption(exported: Path, images: list[Path], *flags: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = caption_main(
            [
                "--export",
                str(exported),
                *map(str, images),
                "--json",
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                *flags,
            ]
        )
    assert code == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == len(images) and all(r["error"] is None for r in records)
    return records


def repeats(tokens: list[int], n: int = 1) -> int:
    """How many n-grams of ``tokens`` occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_question_and_prompt_are_the_tokens_the_model_sees(exported, images, monkeypatch):
    tokenizer = VisualDecoder.from_export(exported).model.llm.tokenizer
    question = "what colour is the shape?"
    question_ids = tokenizer(DEFAULT_QUESTION_TEMPLATE.format(q=question), add_special_tokens=False).input_ids
    prompt_ids = tokenizer("a picture of", add_special_tokens=False).input_ids

    seen = SeenTokens(monkeypatch)
    plain = caption(exported, images)
    assert not seen.contains(question_ids) and not seen.contains(prompt_ids)

    seen.calls.clear()
    asked = caption(exported, images, "--question", question)
    assert seen.contains(question_ids)
    assert [r["tokens"] for r in asked] != [r["tokens"] for r in plain]

    seen.calls.clear()
    template = "Q: {q} A:"
    caption(exported, images, "--question", question, "--question-template", template)
    assert seen.contains(tokenizer(template.format(q=question), add_special_tokens=False).input_ids)
    assert not seen.contains(question_ids)

    seen.calls.clear()
    prompted = caption(exported, images, "--prompt", "a picture of")
    assert seen.contains(prompt_ids) and not seen.contains(question_ids)
    assert [r["tokens"] for r in prompted] != [r["tokens"] for r in plain]


def test_repetition_penalty_and_no_repeat_ngram_size_act_on_repeats(exported, images):
    plain = [r["tokens"] for r in caption(exported, images)]
    assert all(repeats(tokens, 2) > 0 for tokens in plain), plain  # "a small purple circle ... a small ..."

    penalised = [r["tokens"] for r in caption(exported, images, "--repetition-penalty", "5")]
    assert sum(map(repeats, penalised)) < sum(map(repeats, plain)), (plain, penalised)

    # A hard constraint: no bigram twice in any caption.
    constrained = [r["tokens"] for r in caption(exported, images, "--no-repeat-ngram-size", "2")]
    assert all(repeats(tokens, 2) == 0 for tokens in constrained), constrained
    assert constrained != plain


def test_length_penalty_reranks_only_real_beam_hypotheses(exported, images):
    def candidates(penalty: str) -> list[list[int]]:
        records = caption(
            exported,
            images,
            *("--strategy", "beam", "--num-beams", "6", "--num-return-sequences", "6"),
            *("--length-penalty", penalty),
        )
        return [[len(c["tokens"]) for c in r["candidates"]] for r in records]

    # Beam scores are log p / length^penalty: a strongly negative penalty prefers the hypotheses
    # that end first, zero compares raw log-probabilities. However the penalty scales the scores,
    # only real hypotheses are returned, ended by EOS before the token limit: a masked-out row
    # (once scored -1e9, which log p x 16^20 outranks) never is.
    short, neutral = candidates("-20"), candidates("0")
    for per_image in (*short, *neutral):
        assert max(per_image) < MAX_NEW_TOKENS, (short, neutral)
    # The best hypothesis under the negative penalty is never longer than with none.
    assert all(s[0] <= n[0] for s, n in zip(short, neutral, strict=True)), (short, neutral)


def test_magic_returns_clip_guided_captions(exported, images):
    greedy = caption(exported, images)
    magic = caption(exported, images, "--strategy", "magic", "--top-k", "4")
    for record in magic:
        assert record["caption"] and 0 < len(record["tokens"]) <= MAX_NEW_TOKENS
        assert record["score"] is not None and torch.isfinite(torch.tensor(record["score"]))
    # The image's CLIP similarity steers the choice among the top-k: not the greedy path.
    assert [r["tokens"] for r in magic] != [r["tokens"] for r in greedy]
    # No CLIP weight, no degeneration penalty: magic search is greedy decoding.
    unguided = caption(exported, images, "--strategy", "magic", "--top-k", "4", "--alpha", "0", "--beta", "0")
    assert [r["tokens"] for r in unguided] == [r["tokens"] for r in greedy]
