"""LoRA on the frozen LLM: targets by structure, adapter-only exports, merged exports, round trips."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.tiny_checkpoints import tiny_llama_folder
from tests.vqa_helpers import LORA, train_vqa, write_tiny_vqa
from vgtrain.decode import VisualDecoder
from vgtrain.decode.chat import generate_answers, renderer_for
from vgtrain.export.writer import export_checkpoint
from vgtrain.models import build_model
from vgtrain.models.lora import find_lora_targets


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return write_tiny_vqa(tmp_path_factory.mktemp("vqa"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, vqa_dir):
    return train_vqa(tmp_path_factory.mktemp("lora"), vqa_dir, steps=8)


def test_targets_are_found_by_structure_for_gpt2_opt_and_llama(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    gpt2 = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER)).llm.model
    assert sorted({n.rsplit(".", 1)[-1] for n in find_lora_targets(gpt2)}) == ["c_attn", "c_proj"]
    assert all(".attn." in n for n in find_lora_targets(gpt2))  # not the MLP's c_proj
    assert {n.rsplit(".", 1)[-1] for n in find_lora_targets(gpt2, "attention+mlp")} == {
        "c_attn",
        "c_proj",
        "c_fc",
    }
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
        )
    ).requires_grad_(False)
    assert sorted({n.rsplit(".", 1)[-1] for n in find_lora_targets(opt)}) == [
        "k_proj",
        "out_proj",
        "q_proj",
        "v_proj",
    ]
    llama = build_model(
        dict(TINY_VISION), {"name": "tiny", "path": str(tiny_llama_folder(tmp_path))}, dict(TINY_MAPPER)
    )
    names = find_lora_targets(llama.llm.model)
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_lora_starts_as_the_identity_and_only_lora_tensors_train():
    torch.manual_seed(0)
    plain = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER)).eval()
    torch.manual_seed(0)
    lora = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER), None, dict(LORA)).eval()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        a = plain.llm(plain.llm.embed(ids)).last_hidden_state
        b = lora.llm(lora.llm.embed(ids)).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)  # LoRA B starts at zero
    llm_trainable = [n for n, _ in lora.trainable_named_parameters() if n.startswith("llm.")]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert lora.llm.describe()["weights_digest"] == plain.llm.describe()["weights_digest"]
    with pytest.raises(ValueError, match="trainable"):
        build_model(dict(TINY_VISION), {**TINY_LLM, "trainable": True}, dict(TINY_MAPPER), None, dict(LORA))


def _answers(model, renderer, features, questions):
    encodings = [
        renderer.encode([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]
    return generate_answers(model, features, encodings, max_new_tokens=6)


def test_lora_export_holds_no_frozen_tensor_and_decodes_like_the_module(lora_run, tmp_path):
    module, checkpoint, _ = lora_run
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    lora_b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    out = export_checkpoint(checkpoint, tmp_path / "export")
    tensors = load_file(str(out / "adapter.safetensors"))
    assert not set(tensors) & frozen
    assert all(k.startswith("mapper.") or "lora_" in k for k in tensors)
    assert any("lora_" in k for k in tensors)
    decoder = VisualDecoder.from_export(out)
    assert decoder.chat_config["template"] == "plain"
    images = torch.randn(3, 3, 32, 32)
    questions = ["What color is the shape?", "How many shapes are there?", "Is there a red circle?"]
    with torch.no_grad():
        expected = _answers(module.model, renderer_for(decoder), module.model.features(images), questions)
        got = _answers(decoder.model, renderer_for(decoder), decoder.model.features(images), questions)
    assert got == expected

    merged = export_checkpoint(checkpoint, tmp_path / "merged", merge_lora=True)
    merged_tensors = load_file(str(merged / "adapter.safetensors"))
    assert merged_tensors.keys() == {k for k in tensors if "lora_" not in k}
    merged_decoder = VisualDecoder.from_export(merged)
    assert not any("lora_" in n for n, _ in merged_decoder.model.named_parameters())
    with torch.no_grad():
        merged_answers = _answers(
            merged_decoder.model,
            renderer_for(merged_decoder),
            merged_decoder.model.features(images),
            questions,
        )
    assert merged_answers == expected
    # The LLM itself: LoRA-loaded and merged compute what the module computes, and not what the
    # frozen LLM alone does (so the answers above could have told a missing LoRA apart).
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        hidden = [
            m.llm(m.llm.embed(ids)).last_hidden_state
            for m in (module.model, decoder.model, merged_decoder.model)
        ]
        base = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER)).llm
        frozen_hidden = base(base.embed(ids)).last_hidden_state
    assert torch.allclose(hidden[0], hidden[1], atol=1e-5) and torch.allclose(hidden[0], hidden[2], atol=1e-4)
    assert not torch.allclose(hidden[0], frozen_hidden, atol=1e-4)
