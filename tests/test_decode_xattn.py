"""Decoding with cross-attention adapters (alone and with a prefix), on tiny GPT-2 and Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.test_decode import _job
from tests.tiny_checkpoints import heldout_images, tiny_llama_folder, train_tiny
from vgtrain.decode import VisualDecoder, generate_captions
from vgtrain.decode.images import open_image
from vgtrain.decode.reference import greedy_reference
from vgtrain.export.writer import export_checkpoint
from vgtrain.models import build_model

XATTN = {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16, "ff_mult": 2}
ROUTES = {"xattn": (None, XATTN), "both": (TINY_MAPPER, XATTN)}


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory) -> list[Path]:
    return heldout_images(shapes_dir, tmp_path_factory.mktemp("xattn-images"), count=3)


def _decoder(route: str, llm: str, tmp_path_factory) -> VisualDecoder:
    mapper, xattn = ROUTES[route]
    llm_config = (
        dict(TINY_LLM)
        if llm == "gpt2"
        else {"name": "smollm2_135m_hub", "path": str(tiny_llama_folder(tmp_path_factory.getbasetemp()))}
    )
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), llm_config, mapper and dict(mapper), dict(xattn)).double()
    with torch.no_grad():  # open the gates, so that decoding depends on the visual memory
        for block in model.xattn.blocks.values():
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.5)
    return VisualDecoder(model, vision_config=dict(TINY_VISION))


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
@pytest.mark.parametrize("route", ROUTES)
def test_greedy_beam_and_sampling_with_cross_attention(route, llm, images, tmp_path_factory):
    decoder = _decoder(route, llm, tmp_path_factory)
    prompts = decoder.prompts(3, ["what is it?", "where is the small shape?", "colour?"])
    job, features = _job(decoder, images, prompts)
    greedy = [g[0].tokens for g in decoder.decode(features, prompts, "greedy", max_new_tokens=6)]
    assert greedy == [tokens for tokens, _ in greedy_reference(job, max_new_tokens=6)]  # cache == no cache
    beam_one = [g[0].tokens for g in decoder.decode(features, prompts, "beam", num_beams=1, max_new_tokens=6)]
    assert beam_one == greedy
    beams = decoder.decode(features, prompts, "beam", num_beams=3, max_new_tokens=6)
    assert len(beams) == 3 and all(group[0].tokens for group in beams)
    first = decoder.decode(features, prompts, "sample", seed=3, top_p=0.9, max_new_tokens=6)
    again = decoder.decode(features, prompts, "sample", seed=3, top_p=0.9, max_new_tokens=6)
    assert [g[0].tokens for g in first] == [g[0].tokens for g in again]
    # The memory is what the cross-attention reads: other images, other probabilities.
    swapped = features.index_select(torch.tensor([2, 0, 1]))
    scores = [g[0].score for g in decoder.decode(features, prompts, "greedy", max_new_tokens=6)]
    swapped_scores = [g[0].score for g in decoder.decode(swapped, prompts, "greedy", max_new_tokens=6)]
    assert all(abs(a - b) > 1e-6 for a, b in zip(scores, swapped_scores, strict=True))


def test_cross_attention_export_round_trip(shapes_dir, images, tmp_path_factory):
    trained = train_tiny(tmp_path_factory.getbasetemp(), shapes_dir, "xattn", mapper=None, xattn=XATTN)
    exported = export_checkpoint(trained.checkpoint, tmp_path_factory.mktemp("xattn-export") / "export")
    model = trained.module.model
    with torch.no_grad():
        features = model.vision.encode(torch.stack([model.vision.transform(open_image(p)) for p in images]))
    expected = generate_captions(model, features, max_new_tokens=10)
    decoder = VisualDecoder.from_export(exported)
    assert decoder.model.mapper is None and decoder.model.xattn is not None
    assert [r.text for r in decoder.caption(images, max_new_tokens=10)] == expected
    assert any(gate > 0 for gate in decoder.model.xattn.gates().values())
