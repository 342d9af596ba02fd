import pytest
import torch

from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.mapper import MAPPERS, build_mapper


@pytest.mark.parametrize(
    "name,options",
    [
        ("perceiver", {"width": 32, "num_layers": 1, "num_heads": 2, "num_input_tokens": 9}),
        ("linear", {}),
        ("mlp", {}),
        ("mlp", {"hidden_dim": 32}),
        ("transformer", {"width": 32, "num_layers": 1, "num_heads": 2}),
        ("transformer", {"width": 32, "num_layers": 1, "num_heads": 2, "source": "pooled", "clip_length": 3}),
    ],
)
def test_mapper_shapes_and_gradients(name, options):
    mapper = build_mapper(
        name, vision_token_dim=24, vision_embed_dim=16, out_dim=40, prefix_length=5, **options
    )
    features = VisualFeatures(
        tokens=torch.randn(2, 9, 24, requires_grad=True), pooled=torch.randn(2, 16, requires_grad=True)
    )
    prefix = mapper(features)
    assert prefix.shape == (2, 5, 40)
    prefix.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())
    # Each mapper reads exactly the features its source names.
    used = features.tokens if mapper.source == "tokens" else features.pooled
    unused = features.pooled if mapper.source == "tokens" else features.tokens
    assert used.grad is not None and unused.grad is None


def test_each_sample_gets_its_own_prefix():
    mapper = build_mapper(
        "transformer",
        vision_token_dim=8,
        vision_embed_dim=8,
        out_dim=8,
        prefix_length=2,
        width=16,
        num_layers=1,
        num_heads=2,
    )
    features = VisualFeatures(tokens=torch.randn(2, 3, 8), pooled=torch.randn(2, 8))
    prefix = mapper(features)
    single = mapper(VisualFeatures(features.tokens[1:], features.pooled[1:]))
    torch.testing.assert_close(prefix[1:], single)
    assert not torch.allclose(prefix[0], prefix[1])


def test_unknown_mapper_is_refused():
    with pytest.raises(ValueError, match="registered: " + ", ".join(sorted(MAPPERS))):
        build_mapper("resampler", vision_token_dim=8, vision_embed_dim=8, out_dim=8)
