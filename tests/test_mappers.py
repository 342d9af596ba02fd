import pytest
import torch

from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.mapper import MAPPERS, build_mapper
from vgtrain.models.positions import patch_positions


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


def test_transformer_mapper_can_pass_every_visual_token_on():
    """output=inputs: no queries, one prefix embedding per visual token, each from its own place
    (moving one patch's features changes the prefix there most); a prefix_length that disagrees
    with the token count is refused by name."""
    options = dict(vision_token_dim=8, vision_embed_dim=8, out_dim=12, width=16, num_layers=1, num_heads=2)
    mapper = build_mapper("transformer", prefix_length=None, output="inputs", num_input_tokens=4, **options)
    assert mapper.prefix_length == 4 and mapper.queries is None
    features = VisualFeatures(tokens=torch.randn(2, 4, 8), pooled=torch.randn(2, 8))
    prefix = mapper(features)
    assert prefix.shape == (2, 4, 12)
    changed = features.tokens.clone()
    changed[:, 2] += 3.0
    delta = (mapper(VisualFeatures(changed, features.pooled)) - prefix).norm(dim=-1)
    assert (delta.argmax(dim=1) == 2).all()
    with pytest.raises(ValueError, match="set prefix_length to 4 or null, not 8"):
        build_mapper("transformer", prefix_length=8, output="inputs", num_input_tokens=4, **options)
    with pytest.raises(ValueError, match="output must be queries or inputs"):
        build_mapper("transformer", prefix_length=8, output="patches", num_input_tokens=4, **options)


def test_projector_maps_each_visual_token_on_its_own():
    """LLaVA-1.5's projector: one prefix embedding per token, each a function of its own token
    only (changing one token changes that embedding and no other); every weight gets a gradient;
    a prefix_length other than the token count, or the pooled source, is refused by name."""
    options = dict(vision_token_dim=8, vision_embed_dim=6, out_dim=12, num_input_tokens=4)
    mapper = build_mapper("projector", prefix_length=None, **options)
    assert mapper.prefix_length == 4
    features = VisualFeatures(tokens=torch.randn(2, 4, 8, requires_grad=True), pooled=torch.randn(2, 6))
    prefix = mapper(features)
    assert prefix.shape == (2, 4, 12)
    prefix.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())
    changed = features.tokens.detach().clone()
    changed[:, 2] += 3.0
    moved = (mapper(VisualFeatures(changed, features.pooled)) - prefix).detach().norm(dim=-1)
    assert (moved[:, 2] > 0).all() and (moved[:, [0, 1, 3]] == 0).all()
    with pytest.raises(ValueError, match="set prefix_length to 4 or null, not 8"):
        build_mapper("projector", prefix_length=8, **options)
    with pytest.raises(ValueError, match="source=tokens"):
        build_mapper("projector", source="pooled", **options)


def test_projector_grid_kernel_reads_the_neighbouring_tokens():
    """grid_kernel=3 (MobileVLM's local context): at the start exactly the plain projector (the
    residual convolution is zero); once trained, a change to one token of the 3x3 grid moves the
    prefix at that token and its eight-neighbourhood only, and the convolution gets a gradient.
    An even kernel or a non-square grid is refused."""
    options = dict(vision_token_dim=8, vision_embed_dim=6, out_dim=12, hidden_dim=10)
    torch.manual_seed(0)
    plain = build_mapper("projector", num_input_tokens=16, **options)
    torch.manual_seed(0)
    local = build_mapper("projector", num_input_tokens=16, grid_kernel=3, **options)
    features = VisualFeatures(tokens=torch.randn(2, 16, 8), pooled=torch.randn(2, 6))
    torch.testing.assert_close(local(features), plain(features))
    local(features).square().mean().backward()
    assert local.grid_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        local.grid_conv.weight.normal_()
    changed = features.tokens.clone()
    changed[:, 0] += 3.0  # the top-left token of the 4x4 grid
    with torch.no_grad():
        moved = (local(VisualFeatures(changed, features.pooled)) - local(features)).norm(dim=-1)
    neighbours = [0, 1, 4, 5]
    assert (moved[:, neighbours] > 0).all()
    assert (moved[:, [i for i in range(16) if i not in neighbours]] == 0).all()
    with pytest.raises(ValueError, match="odd size over a square token grid; got 2 over 16"):
        build_mapper("projector", num_input_tokens=16, grid_kernel=2, **options)
    with pytest.raises(ValueError, match="got 3 over 8 tokens"):
        build_mapper("projector", num_input_tokens=8, grid_kernel=3, **options)


def test_projector_depth_is_llava_mlp_nx_gelu():
    """depth=3 is LLaVA's mlp3x_gelu (three linear layers, GELU between); depth=1 is refused."""
    options = dict(vision_token_dim=8, vision_embed_dim=6, out_dim=12, num_input_tokens=4, hidden_dim=10)
    mapper = build_mapper("projector", depth=3, **options)
    linears = [m for m in mapper.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 10), (10, 10), (10, 12)]
    assert sum(isinstance(m, torch.nn.GELU) for m in mapper.net) == 2
    with pytest.raises(ValueError, match="at least 2 linear layers"):
        build_mapper("projector", depth=1, **options)


def test_unknown_mapper_is_refused():
    with pytest.raises(ValueError, match="registered: " + ", ".join(sorted(MAPPERS))):
        build_mapper("resampler", vision_token_dim=8, vision_embed_dim=8, out_dim=8)


def test_patch_positions_start_at_the_grid_rows_and_columns():
    """The learned position embedding starts at the 2-D sine-cosine table: tokens of one row
    share its first half, tokens of one column its second, every token differs from every other
    by a margin at the features' scale, and non-square counts get 1-D positions."""
    table = patch_positions(16, 64).detach()
    grid = table.view(4, 4, 64)
    assert torch.allclose(grid[:, :1, :32].expand(4, 4, 32), grid[..., :32])  # rows: first half
    assert torch.allclose(grid[:1, :, 32:].expand(4, 4, 32), grid[..., 32:])  # columns: second half
    distances = torch.cdist(table, table) + torch.eye(16) * 1e3
    assert distances.min() > 0.5 and 0.3 < table.std() < 1.0
    assert patch_positions(10, 7).shape == (10, 7) and patch_positions(10, 7).requires_grad
    mapper = build_mapper(
        "transformer",
        vision_token_dim=8,
        vision_embed_dim=8,
        out_dim=8,
        width=32,
        num_heads=2,
        num_input_tokens=16,
    )
    assert torch.equal(mapper.input_pos.detach(), patch_positions(16, 32).detach())
