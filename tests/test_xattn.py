"""Gated cross-attention on GPT-2, OPT and Llama-family tiny configs."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from vgtrain.models.xattn import CrossAttentionAdapter, find_decoder_layers

VOCAB = 97


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=2, n_positions=64))


def _opt():
    return OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    )


def _llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


FAMILIES = {"gpt2": _gpt2, "opt": _opt, "llama": _llama}


def _wrapped(factory, **options):
    torch.manual_seed(0)
    llm = factory().eval().requires_grad_(False)
    adapter = CrossAttentionAdapter(llm, 32, memory_dim=24, num_heads=2, head_dim=8, ff_mult=2, **options)
    return llm, adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_gates_leave_logits_unchanged(family):
    torch.manual_seed(0)
    bare = FAMILIES[family]().eval()
    llm, adapter = _wrapped(FAMILIES[family])
    ids = torch.randint(0, VOCAB, (2, 9))
    with adapter.bind(torch.randn(2, 5, 24)):
        wrapped_logits = llm(ids).logits
    assert (wrapped_logits - bare(ids).logits).abs().max() <= 1e-5
    # The LLM's own keys are untouched: a bare checkpoint loads strictly into the wrapped model.
    assert set(llm.state_dict()) == set(bare.state_dict())
    llm.load_state_dict(bare.state_dict(), strict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_moves_the_gates_and_only_adapter_parameters(family):
    llm, adapter = _wrapped(FAMILIES[family], every=2)
    assert adapter.layer_indices == [1, 3]
    llm_before = {k: v.clone() for k, v in llm.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 9))
    with adapter.bind(torch.randn(2, 5, 24)):
        loss = llm(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, llm_before[k]) for k, v in llm.state_dict().items())
    assert all(abs(v) > 0 for v in adapter.gates().values())
    changed = {k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])}
    assert {"blocks.1.attn_gate", "blocks.3.attn_gate", "blocks.1.ff_gate"} <= changed


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_and_without_cache_agree(family):
    llm, adapter = _wrapped(FAMILIES[family])
    with torch.no_grad():
        for block in adapter.blocks.values():  # open the gates so the memory matters
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    ids = torch.randint(1, VOCAB, (2, 4))
    memory = torch.randn(2, 5, 24)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with adapter.bind(memory):
        cached = llm.generate(ids, use_cache=True, **options)
        uncached = llm.generate(ids, use_cache=False, **options)
        beams = llm.generate(ids, num_beams=3, **options)  # memory expanded for the beams
    assert torch.equal(cached, uncached)
    assert beams.shape[0] == 2
    with adapter.bind(memory.flip(0)):
        assert not torch.equal(llm.generate(ids, **options), cached)


def test_adapter_state_round_trips():
    llm, adapter = _wrapped(_gpt2, layers=[0, 2])
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)
    _, fresh = _wrapped(_gpt2, layers=[0, 2])
    fresh.load_state_dict(adapter.state_dict(), strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(adapter.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


def test_unbound_memory_and_unknown_stacks_fail_clearly():
    llm, _ = _wrapped(_gpt2)
    with pytest.raises(RuntimeError, match="bind"):
        llm(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="Linear"):
        find_decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not in the LLM"):
        CrossAttentionAdapter(_gpt2(), 32, 24, layers=[7])
