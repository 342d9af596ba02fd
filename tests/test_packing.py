"""Sequence packing (data.pack_length): rows of several samples give the unpacked batch's loss."""

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.test_conversation import DIALOGUE
from vgtrain.data.conversation import ConversationCollator
from vgtrain.data.packing import first_fit_rows
from vgtrain.models import build_model
from vgtrain.models.chat_template import ConversationRenderer
from vgtrain.models.prefix_lm import PackedRows
from vgtrain.training.callbacks import samples_in

QUESTION = [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "circle"}]
ASKED_FIRST = [{"role": "user", "content": "Is it red?\n<image>"}, {"role": "assistant", "content": "no"}]


def test_first_fit_decreasing_fills_rows_up_to_the_capacity():
    lengths = [7, 3, 5, 2, 9, 4]
    rows = first_fit_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))  # each sample once
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[4], [0, 1], [2, 5], [3]]  # 9 | 7 3 | 5 4 | 2: longest first, first row with room
    assert first_fit_rows([12, 3], capacity=10) == [[0], [1]]  # too long: a row of its own, uncut


def build(name: str, pack_length: int):
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), dict(TINY_LLM, trainable=True), dict(TINY_MAPPER))
    model.llm.model.config._attn_implementation = name
    tokenizer = model.llm.tokenizer
    renderer = ConversationRenderer(tokenizer, prefix_length=model.prefix_length)
    collate = ConversationCollator(tokenizer, renderer, model.prefix_length, pack_length=pack_length)
    return model, collate


def samples():
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = [{"conversation": DIALOGUE}, {"caption": "a red circle"}, {"conversation": QUESTION}]
    texts += [{"conversation": ASKED_FIRST}, {"caption": "two small blue squares left of a circle"}]
    return [
        {**text, "image": image, "key": str(i)}
        for i, (text, image) in enumerate(zip(texts, images, strict=True))
    ]


def loss_and_grads(model, batch):
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        pixel_values=batch["pixel_values"],
        image_position=batch["image_position"],
        loss_index=batch.get("loss_index"),
        loss_targets=batch.get("loss_targets"),
        packed=PackedRows.from_batch(batch),
    )
    model.zero_grad()
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.trainable_named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(attention):
    model, padded = build(attention, pack_length=0)
    _, packed = build(attention, pack_length=40)
    batch, rows = padded(samples()), packed(samples())
    assert rows["input_ids"].shape[0] < batch["input_ids"].shape[0] == 5  # fewer rows ...
    assert rows["labels"].numel() < batch["labels"].numel()  # ... and fewer positions
    assert samples_in(rows) == samples_in(batch) == 5
    # Every sample keeps its answer tokens, and each restarts its positions at 0.
    assert int((rows["labels"] != -100).sum()) == int((batch["labels"] != -100).sum())
    segment_starts = rows["pack_positions"] == 0
    assert int((segment_starts & (rows["pack_segments"] >= 0)).sum()) == 5
    expected, expected_grads = loss_and_grads(model, batch)
    out, grads = loss_and_grads(model, rows)
    assert int(out.num_tokens) == int(expected.num_tokens)
    assert int(out.num_correct) == int(expected.num_correct)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_sample_cannot_see_the_one_before_it_in_its_row():
    """Changing one sample's image changes no other sample's loss terms in a packed row."""
    model, packed = build("sdpa", pack_length=200)  # all five in one row
    model.eval()
    batch = packed(samples())
    assert batch["input_ids"].shape[0] == 1
    other = dict(batch, pixel_values=batch["pixel_values"].clone())
    other["pixel_values"][0] += 1.0
    with torch.no_grad():
        hidden = [
            model.packed_embeddings(
                model.features(b["pixel_values"]), b["input_ids"], PackedRows.from_batch(b)
            )
            for b in (batch, other)
        ]
        outs = [model.llm(e, m, position_ids=p).last_hidden_state for e, m, p in hidden]
    changed = (outs[0] - outs[1]).abs().amax(-1)[0] > 1e-6
    segments = batch["pack_segments"][0]
    prefix_start = batch["input_ids"].numel()  # the first sample's prefix, in the gathered pool
    reads_image_0 = (batch["pack_index"][0] >= prefix_start) & (batch["pack_index"][0] < prefix_start + 4)
    own = set(segments[reads_image_0].tolist())
    # Only positions of the sample whose image changed moved, and all its positions from its prefix on.
    assert len(own) == 1 and set(segments[changed].tolist()) == own
    first_prefix = int(reads_image_0.nonzero()[0])
    assert changed[first_prefix : int((segments == own.pop()).nonzero()[-1]) + 1].all()


def test_packing_is_refused_for_cross_attention():
    model = build_model(
        dict(TINY_VISION),
        dict(TINY_LLM),
        dict(TINY_MAPPER),
        {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16},
    )
    tokenizer = model.llm.tokenizer
    collate = ConversationCollator(
        tokenizer, ConversationRenderer(tokenizer, prefix_length=4), 4, pack_length=64
    )
    batch = collate(samples())
    with pytest.raises(ValueError, match="data.pack_length.*cross-attention"):
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            pixel_values=batch["pixel_values"],
            packed=PackedRows.from_batch(batch),
        )
    with pytest.raises(ValueError, match="pack_length must be >= 0"):
        ConversationCollator(tokenizer, ConversationRenderer(tokenizer, prefix_length=4), 4, pack_length=-1)


def test_the_config_key_is_checked_against_the_model_before_training():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from vgtrain.cli.train import pack_length
    from vgtrain.errors import ConfigError

    cfg = OmegaConf.create({"data": {"pack_length": 96}})
    prefix_only = SimpleNamespace(model=build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER)))
    xattn = {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16}
    with_xattn = SimpleNamespace(
        model=build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER), xattn)
    )
    assert pack_length(cfg, prefix_only) == 96  # type: ignore[arg-type]
    assert pack_length(OmegaConf.create({"data": {}}), with_xattn) == 0  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.pack_length=96.*cross-attention"):
        pack_length(cfg, with_xattn)  # type: ignore[arg-type]
