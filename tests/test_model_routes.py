"""The composed model with prefix only, cross-attention only, and both."""

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from vgtrain.data.collate import IGNORE_INDEX, CaptionCollator
from vgtrain.decode import generate_captions
from vgtrain.models import build_model

XATTN = {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16, "ff_mult": 2}
ROUTES = {
    "prefix": (TINY_MAPPER, None),
    "xattn": (None, XATTN),
    "xattn_resampler": (
        None,
        {**XATTN, "resampler": {"width": 32, "num_latents": 3, "num_layers": 1, "num_heads": 2}},
    ),
    "both": (TINY_MAPPER, XATTN),
    "perceiver_prefix": (
        {"name": "perceiver", "prefix_length": 3, "width": 32, "num_layers": 1, "num_heads": 2},
        None,
    ),
}


def _batch(model, captions=("a red circle", "a small blue square at the top left")):
    collate = CaptionCollator(model.llm.tokenizer, prefix_length=model.prefix_length)
    batch = collate([{"caption": c, "key": str(i)} for i, c in enumerate(captions)])
    batch["pixel_values"] = torch.randn(len(captions), 3, 32, 32)
    return batch


@pytest.mark.parametrize("route", ROUTES)
def test_each_route_trains_only_its_adapters(route):
    mapper, xattn = ROUTES[route]
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), mapper and dict(mapper), xattn and dict(xattn))
    batch = _batch(model)
    out = model(
        batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"]
    )
    out.loss.backward()
    trainable = {name for name, _ in model.trainable_named_parameters()}
    assert trainable and not any(name.startswith(("vision.", "llm.")) for name in trainable)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    # Every caption token and EOS is a target; the BOS that starts a prefix-free sequence is not.
    assert out.num_tokens == (batch["labels"] != IGNORE_INDEX).sum()
    captions = generate_captions(model, model.features(pixel_values=batch["pixel_values"]), max_new_tokens=4)
    assert len(captions) == 2


def test_closed_gates_without_prefix_give_the_bare_llm_logits():
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), None, dict(XATTN))
    batch = _batch(model)
    features = model.features(pixel_values=batch["pixel_values"])
    embeds, mask = model.input_embeddings(features, batch["input_ids"], batch["attention_mask"])
    with model.visual_context(features):
        wrapped = model.llm.logits(model.llm(embeds, mask).last_hidden_state)
    model.xattn.remove()
    bare = model.llm.logits(model.llm(embeds, mask).last_hidden_state)
    assert (wrapped - bare).abs().max() <= 1e-5
    assert batch["input_ids"][0, 0] == model.llm.tokenizer.eos_token_id  # BOS (GPT-2 uses EOS)


def test_a_model_needs_a_route():
    with pytest.raises(ValueError, match="mapper"):
        build_model(dict(TINY_VISION), dict(TINY_LLM), {"name": "none"}, {"name": "none"})
