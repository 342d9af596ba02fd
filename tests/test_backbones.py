import pytest
import torch

from tests.conftest import TINY_LLM, TINY_VISION
from vgtrain.models.backbones import BackboneError, build_llm, build_vision


def test_tiny_backbones_rebuild_bit_identically():
    a, b = build_vision(**TINY_VISION), build_vision(**TINY_VISION)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert (
        build_llm(**TINY_LLM).describe()["weights_digest"]
        == build_llm(**TINY_LLM).describe()["weights_digest"]
    )
    other_seed = build_vision(**{**TINY_VISION, "init_seed": 1})
    assert other_seed.describe()["weights_digest"] != a.describe()["weights_digest"]


def test_vision_features_have_the_advertised_shapes():
    vision = build_vision(**TINY_VISION)
    features = vision.encode(torch.randn(3, 3, 32, 32))
    assert vision.num_tokens == 4  # 4x4 patch grid pooled by 2
    assert features.tokens.shape == (3, vision.num_tokens, vision.token_dim)
    assert features.pooled.shape == (3, vision.embed_dim)


def test_frozen_backbones_stay_in_eval_mode_without_gradients():
    vision, llm = build_vision(**TINY_VISION), build_llm(**TINY_LLM)
    for backbone in (vision, llm):
        backbone.train()
        assert not backbone.training
        assert all(not m.training for m in backbone.modules())
        assert all(not p.requires_grad for p in backbone.parameters())


def test_trainable_llm_trains():
    llm = build_llm(**TINY_LLM, trainable=True)
    llm.train()
    assert llm.training and all(p.requires_grad for p in llm.parameters())


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(BackboneError, match="registered: .*clip_vit_b32"):
        build_vision("clip_vit_b99")
    with pytest.raises(BackboneError, match="registered: .*gpt2"):
        build_llm("gpt5")


def test_hub_backbone_offline_fails_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="model.llm.path"):
        build_llm("gpt2")


def test_llm_loads_from_a_local_folder(tmp_path):
    tiny = build_llm(**TINY_LLM)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = build_llm("gpt2", path=str(tmp_path))
    assert local.source == str(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(local.model(ids).logits, tiny.model(ids).logits)


def test_vision_tower_runs_in_fp32_under_cpu_autocast():
    """CPU bf16 autocast is several times slower for the open_clip tower; encode opts out."""
    vision = build_vision(**TINY_VISION)
    images = torch.randn(2, 3, 32, 32)
    reference = vision.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = vision.encode(images)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is left as it was
    assert features.tokens.dtype == torch.float32
    torch.testing.assert_close(features.tokens, reference.tokens)
    torch.testing.assert_close(features.pooled, reference.pooled)


def test_tiny_tokenizer_pads_with_a_token_of_its_own():
    """Pad = EOS makes transformers warn about a missing attention mask on every decode."""
    from vgtrain.models.backbones.tiny import build_tiny_gpt2, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    model = build_tiny_gpt2(tokenizer, width=32, layers=1, heads=2)
    assert model.config.pad_token_id == tokenizer.pad_token_id != model.config.eos_token_id


def test_tiny_gpt2_mlp_width():
    """model.llm.arch.mlp_width sets the GELU MLP's hidden width (GPT-2's n_inner; 4 x width unset)."""
    from vgtrain.models.backbones.registry import build_llm

    arch = {"family": "gpt2", "width": 48, "layers": 1, "heads": 2}
    default = build_llm("tiny", arch=arch).model.transformer.h[0].mlp
    wide = build_llm("tiny", arch={**arch, "mlp_width": 384}).model.transformer.h[0].mlp
    assert default.c_fc.weight.shape == (48, 192)  # Conv1D: [in, out]
    assert wide.c_fc.weight.shape == (48, 384) and wide.c_proj.weight.shape == (384, 48)


def test_tiny_llm_of_the_llama_family():
    """model.llm.arch.family=llama: SmolLM2's blocks at the tiny size (a gated MLP of 8/3 x width,
    as many MLP weights as GPT-2's), rebuilt identically from init_seed; an unknown family is
    refused by its config key."""
    from transformers import LlamaForCausalLM

    from vgtrain.models.backbones.registry import build_llm

    arch = {"family": "llama", "width": 48, "layers": 1, "heads": 2}
    llm = build_llm("tiny", arch=arch, init_seed=3)
    model = llm.model
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.intermediate_size == 128  # 8/3 x 48 = 128
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    mlp = model.model.layers[0].mlp
    gpt2_mlp_weights = 2 * 48 * 4 * 48
    assert sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("weight")) == gpt2_mlp_weights
    again = build_llm("tiny", arch=arch, init_seed=3).model
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match=r"model.llm.arch.family='mamba'; tiny LMs are gpt2, llama"):
        build_llm("tiny", arch={**arch, "family": "mamba"})
