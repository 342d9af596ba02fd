"""The static-cache decoding loops against transformers' ``generate`` (the previous implementation)
and against full recomputation: same tokens for greedy, beam and seeded sampling, on tiny GPT-2
and Llama LLMs, prefix and cross-attention routes, rows of different lengths (left padding)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import OPTConfig

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.test_decode import _job
from tests.tiny_checkpoints import heldout_images, tiny_llama_folder
from vgtrain.decode import Decoding, VisualDecoder, generate_captions
from vgtrain.decode.base import until_eos
from vgtrain.decode.reference import greedy_reference
from vgtrain.decode.search import Limits, sample_or_greedy
from vgtrain.decode.static_lm import StaticLM, engine, supports
from vgtrain.decode.strategies import get_strategy
from vgtrain.models import build_model
from vgtrain.models.xattn import find_decoder_layers

XATTN = {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16, "ff_mult": 2}
ROUTES = {"prefix": (TINY_MAPPER, None), "xattn": (None, XATTN), "both": (TINY_MAPPER, XATTN)}
QUESTIONS = ["what is it?", "what colour is the shape on the left of the image?", "where?"]


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory) -> list[Path]:
    return heldout_images(shapes_dir, tmp_path_factory.mktemp("static-images"), count=3)


def _decoder(route: str, llm: str, tmp_path_factory: pytest.TempPathFactory) -> VisualDecoder:
    mapper, xattn = ROUTES[route]
    llm_config = (
        dict(TINY_LLM)
        if llm == "gpt2"
        else {"name": "smollm2_135m_hub", "path": str(tiny_llama_folder(tmp_path_factory.getbasetemp()))}
    )
    torch.manual_seed(0)
    model = build_model(
        dict(TINY_VISION), llm_config, dict(mapper or {"name": "none"}), dict(xattn or {})
    ).double()  # float64: no near-tie can flip an argmax between two correct implementations
    with torch.no_grad():
        if model.xattn is not None:  # open the gates, so that decoding depends on the visual memory
            for block in model.xattn.blocks.values():
                block.attn_gate.fill_(0.8)
                block.ff_gate.fill_(0.5)
    return VisualDecoder(model, vision_config=dict(TINY_VISION))


def _frequent_token_as_eos(decoder: VisualDecoder, job: Decoding) -> None:
    """Random tiny models almost never emit EOS; declaring a token they do emit the EOS makes rows
    stop at varied steps (and the padding token, still the real EOS, now differs from it)."""
    rows = get_strategy("greedy").run_static(job, get_strategy("greedy").resolve({"max_new_tokens": 10}))
    tokens, counts = rows[:, 1:].flatten().unique(return_counts=True)
    tokenizer = decoder.model.llm.tokenizer
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(tokens[counts.argmax()]))


def _rows(sequences: torch.Tensor, eos: int) -> list[tuple[list[int], bool]]:
    return [until_eos(row, eos) for row in sequences.tolist()]


CASES = [
    ("greedy", {}),
    ("greedy", {"min_new_tokens": 3}),
    ("beam", {"num_beams": 3}),
    ("beam", {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.5}),
    ("beam", {"num_beams": 3, "early_stopping": True, "min_new_tokens": 2}),
    ("beam", {"num_beams": 2, "early_stopping": "never", "length_penalty": 2.0}),
    ("sample", {"seed": 5, "top_k": 0, "top_p": 0.9, "temperature": 1.3}),
    ("sample", {"seed": 6, "top_k": 7, "num_return_sequences": 2}),
]


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
@pytest.mark.parametrize("route", ROUTES)
def test_static_cache_loops_give_generates_tokens(route, llm, images, tmp_path_factory):
    decoder = _decoder(route, llm, tmp_path_factory)
    prompts = decoder.prompts(3, QUESTIONS)
    job, _ = _job(decoder, images, prompts)
    _frequent_token_as_eos(decoder, job)
    eos = decoder.model.llm.eos_token_id
    assert eos != decoder.model.llm.tokenizer.pad_token_id
    ended_early = 0
    for name, options in CASES:
        strategy = get_strategy(name)
        o = strategy.resolve({"max_new_tokens": 10, **options})
        assert strategy.lean(job, o)
        runs = []
        for run in (strategy.run_static, strategy.run_generate):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(o.get("seed") or 0)
                runs.append(_rows(run(job, o), eos))
        assert runs[0] == runs[1], (name, options)
        ended_early += sum(ended and len(tokens) < 9 for tokens, ended in runs[0])
    assert ended_early >= 3  # EOS bookkeeping was exercised, not only full-length rows


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_static_greedy_equals_full_recompute_and_padding_changes_nothing(llm, images, tmp_path_factory):
    decoder = _decoder("both", llm, tmp_path_factory)
    prompts = decoder.prompts(3, QUESTIONS)
    job, features = _job(decoder, images, prompts)
    assert job.inputs.attention_mask[:, 0].tolist() == [0, 1, 0]  # left padding in rows 0 and 2
    greedy = [g[0].tokens for g in decoder.decode(features, prompts, "greedy", max_new_tokens=8)]
    assert greedy == [tokens for tokens, _ in greedy_reference(job, max_new_tokens=8)]
    for row in range(3):
        alone = decoder.decode(features.index_select(torch.tensor([row])), [prompts[row]], max_new_tokens=8)
        assert alone[0][0].tokens == greedy[row]


def test_the_loop_checks_for_stopping_only_every_few_tokens(images, tmp_path_factory, monkeypatch):
    """Host syncs: one ``bool()`` per ``check_every`` tokens, and none of the rows' tokens change."""
    decoder = _decoder("prefix", "gpt2", tmp_path_factory)
    job, _ = _job(decoder, images, decoder.prompts(3))
    llm, inputs = job.llm, job.inputs
    limits = Limits(12, 12, llm.eos_token_id, llm.tokenizer.pad_token_id)  # no EOS: all 12 steps
    syncs = {"n": 0}
    real_bool = torch.Tensor.__bool__

    def counting_bool(self: torch.Tensor) -> bool:
        syncs["n"] += 1
        return real_bool(self)

    results = {}
    for every in (1, 4):
        lm = StaticLM(llm, inputs.attention_mask, inputs.attention_mask.shape[1] + 12)
        syncs["n"] = 0
        monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
        results[every] = sample_or_greedy(lm, inputs.embeds, limits, check_every=every)
        monkeypatch.setattr(torch.Tensor, "__bool__", real_bool)
        assert syncs["n"] == 11 // every  # no check after the last token
    assert torch.equal(results[1], results[4]) and results[1].shape == (3, 12)


def test_other_llms_and_generate_only_options_fall_back_to_generate(images, tmp_path_factory):
    decoder = _decoder("prefix", "gpt2", tmp_path_factory)
    prompts = decoder.prompts(3)
    job, features = _job(decoder, images, prompts)
    greedy = get_strategy("greedy")
    assert greedy.lean(job, greedy.resolve({}))
    assert not greedy.lean(job, greedy.resolve({"repetition_penalty": 1.3}))
    assert not greedy.lean(job, greedy.resolve({"no_repeat_ngram_size": 2}))
    assert not greedy.lean(job, greedy.resolve({"stop_strings": ["."]}))
    layer = find_decoder_layers(job.llm.model.base_model)[1]
    handle = layer.register_forward_hook(lambda module, args, output: None)
    assert not greedy.lean(job, greedy.resolve({}))  # only generate would run that hook
    handle.remove()
    opt = SimpleNamespace(model=SimpleNamespace(config=OPTConfig()))
    assert "model type 'opt'" in supports(opt)
    with pytest.raises(ValueError, match="num_return_sequences"):  # generate's own explanation
        decoder.decode(features, prompts, "greedy", num_return_sequences=2)
    plain = decoder.decode(features, prompts, "greedy", max_new_tokens=8)
    penalised = decoder.decode(features, prompts, "greedy", repetition_penalty=5.0, max_new_tokens=8)
    assert [g[0].tokens for g in penalised] != [g[0].tokens for g in plain]  # generate's processor ran


def _greedy_rows(job: Decoding, order: list[int], step_mode: str) -> torch.Tensor:
    """Greedy tokens of the job's rows in ``order``, through :func:`engine` (memory bound)."""
    inputs, llm = job.inputs, job.llm
    rows = torch.tensor(order, device=inputs.embeds.device)
    mask, embeds = inputs.attention_mask[rows], inputs.embeds[rows]
    limits = Limits(10, 0, llm.eos_token_id, llm.tokenizer.pad_token_id)
    with job.bind_memory(1, rows=order):
        lm, step = engine(llm, mask, mask.shape[1] + 10, job.xattn, job.xattn.memory, step_mode)
        return sample_or_greedy(lm, embeds, limits, step=step, check_every=100)


def test_a_static_lm_reset_with_another_batch_decodes_it_as_a_fresh_one(images, tmp_path_factory):
    """What lets a captured CUDA graph serve the next batch: reset() refills the same buffers."""
    decoder = _decoder("both", "gpt2", tmp_path_factory)
    job, _ = _job(decoder, images, decoder.prompts(3, QUESTIONS))
    llm, inputs = job.llm, job.inputs
    limits = Limits(10, 0, llm.eos_token_id, llm.tokenizer.pad_token_id)
    fresh = _greedy_rows(job, [2, 0, 1], "eager")
    with job.bind_memory(1):
        lm = StaticLM(
            llm, inputs.attention_mask, inputs.attention_mask.shape[1] + 10, job.xattn, job.xattn.memory
        )
        first = sample_or_greedy(lm, inputs.embeds, limits)
    rows = torch.tensor([2, 0, 1])
    with job.bind_memory(1, rows=[2, 0, 1]):
        lm.reset(inputs.attention_mask[rows], job.xattn.memory)
        again = sample_or_greedy(lm, inputs.embeds[rows], limits)
    assert torch.equal(again, fresh) and torch.equal(first[rows], fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_gives_the_eager_tokens_without_host_syncs(images, tmp_path_factory):
    decoder = _decoder("both", "gpt2", tmp_path_factory)
    decoder.model.float().cuda()
    decoder.device = torch.device("cuda")
    prompts = decoder.prompts(3, QUESTIONS)
    job, _ = _job(decoder, images, prompts)
    job.inputs.embeds, job.inputs.attention_mask = job.inputs.embeds.cuda(), job.inputs.attention_mask.cuda()
    eager = _greedy_rows(job, [0, 1, 2], "eager")
    graphed = _greedy_rows(job, [0, 1, 2], "cuda-graph")  # captures (capturing synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the next batch of the same shapes replays the captured graph: no capture, no sync
        again = _greedy_rows(job, [2, 0, 1], "cuda-graph")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(eager, graphed) and torch.equal(again, eager[torch.tensor([2, 0, 1], device="cuda")])


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_training_time_captions_are_generates(llm, images, tmp_path_factory):
    """generate_captions (validation metrics, held-out eval) runs greedy on the static cache; any
    generate keyword (here the default one, spelt out) takes transformers' generate instead."""
    decoder = _decoder("both", llm, tmp_path_factory)
    model = decoder.model
    _, features = _job(decoder, images, decoder.prompts(3))
    static = generate_captions(model, features, prompt="a photo of", max_new_tokens=8)
    assert static == generate_captions(
        model, features, prompt="a photo of", max_new_tokens=8, do_sample=False
    )
    assert len(static) == 3 and all(static)
