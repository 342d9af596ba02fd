"""model.loss_reduction=sample: the batch loss is the mean of each sample's own mean."""

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.test_packing import build, loss_and_grads, samples
from vgtrain.models.lm_loss import (
    caption_loss,
    caption_positions,
    resolve_implementation,
    sample_mean_weights,
)
from vgtrain.training.callbacks import samples_in
from vgtrain.training.module import CaptioningModule


def per_sample_means(model, collate) -> torch.Tensor:
    """Each sample alone in a batch of one, with the token mean: its own mean loss."""
    model.loss_reduction = "token"
    losses = [loss_and_grads(model, collate([sample]))[0].loss for sample in samples()]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("pack_length", [0, 40])
def test_sample_mean_is_the_mean_of_each_samples_own_loss(pack_length):
    model, collate = build("sdpa", pack_length=pack_length)
    expected = per_sample_means(model, collate)
    batch = collate(samples())
    token_mean = loss_and_grads(model, batch)[0].loss
    model.loss_reduction = "sample"
    out, _ = loss_and_grads(model, batch)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert int(out.num_samples) == samples_in(batch) == 5
    # The batch mixes a caption of 8 tokens with one-word answers: the two means differ.
    assert abs(token_mean.item() - expected.item()) > 1e-3


def test_packed_and_padded_batches_agree_under_the_sample_mean():
    model, padded = build("sdpa", pack_length=0)
    _, packed = build("sdpa", pack_length=40)
    model.loss_reduction = "sample"
    expected, expected_grads = loss_and_grads(model, padded(samples()))
    out, grads = loss_and_grads(model, packed(samples()))
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_head_gives_the_weighted_loss_and_gradients_of_the_plain_one():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 8, generator=generator, requires_grad=True)
    head = torch.randn(11, 8, generator=generator, requires_grad=True)
    labels = torch.full((3, 7), -100)
    labels[0, 3:6] = torch.tensor([1, 2, 3])
    labels[1, 5] = 4
    labels[2, 2:7] = torch.tensor([5, 6, 7, 8, 9])
    index, targets = caption_positions(labels)
    weights, count = sample_mean_weights(torch.div(index, 6, rounding_mode="floor"), 3)
    assert int(count) == 3 and float(weights.sum()) == pytest.approx(1.0)
    assert weights.tolist()[3] == pytest.approx(1 / 3)  # the one-token sample weighs a third
    results = []
    for how in ("torch", "chunked"):
        loss = caption_loss(hidden, index, targets, head, implementation=how, position_weights=weights).loss
        results.append((loss, *torch.autograd.grad(loss, (hidden, head))))
    for plain, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_weighted_loss_avoids_liger_and_refuses_it_by_name():
    assert resolve_implementation("auto", torch.device("cuda"), weighted=True) == "chunked"
    with pytest.raises(ValueError, match="loss_reduction=sample"):
        resolve_implementation("liger", torch.device("cuda"), weighted=True)


def test_an_unknown_reduction_is_refused_by_its_config_key():
    with pytest.raises(ValueError, match=r"model.loss_reduction='mean'; choose from token, sample"):
        CaptioningModule(
            vision=dict(TINY_VISION),
            llm=dict(TINY_LLM),
            mapper=dict(TINY_MAPPER),
            optimizer=torch.optim.AdamW,
            scheduler={},
            loss_reduction="mean",
        )
