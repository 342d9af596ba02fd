"""Cached conversation data: visits drawn in the sampler, length-grouped batches, exact resume."""

from __future__ import annotations

import random

import pytest
import torch

from vgtrain.data.conversation import ConversationPicker
from vgtrain.data.feature_cache import CachedFeatures
from vgtrain.errors import ConfigError
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.resumable import ResumableDataLoader
from vgtrain.training.visit_sampler import VisitSampler, group_by_length


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _cache(count: int = 256) -> CachedFeatures:
    """Samples with a short caption, a one-turn question and a long two-turn dialogue."""
    conversations = [
        [
            _turns(f"What color is shape {i}?", "red"),
            _turns(f"Describe the whole scene number {i} in detail, please?", "a large red circle")
            + _turns("And what is left of it, and how big is that one?", "a small blue square"),
        ]
        for i in range(count)
    ]
    return CachedFeatures(
        torch.zeros(count, 2, 3),
        torch.zeros(count, 3),
        [f"cap {i}" for i in range(count)],
        [f"k{i}" for i in range(count)],
        conversations=conversations,
    )


def _padding(cache: CachedFeatures, order: list, batch_size: int) -> float:
    """Share of padded positions when ``order`` is cut into batches padded to their longest."""
    lengths = [cache.visit_length(*item) for item in order]
    padded = sum(
        max(lengths[i : i + batch_size]) * batch_size
        for i in range(0, len(lengths) - batch_size + 1, batch_size)
    )
    used = sum(lengths[: len(lengths) // batch_size * batch_size])
    return 1 - used / padded


def test_visits_are_drawn_per_epoch_and_grouped_batches_pad_less():
    cache = _cache()
    picker = ConversationPicker(0, caption_share=0.5)
    plain = VisitSampler(cache, picker, batch_size=16, seed=1)
    grouped = VisitSampler(cache, picker, batch_size=16, group_batches=8, seed=1)
    order = grouped.epoch_order()
    assert sorted(index for index, _ in order) == list(range(len(cache)))  # each sample once an epoch
    assert order == grouped.epoch_order()  # a pure function of (seed, epoch)
    assert sorted(order) == sorted(plain.epoch_order())  # grouping reorders the same visits
    captions = sum(visit == () for _, visit in order)
    assert 90 < captions < 166  # caption share 0.5 of 256
    assert {visit for _, visit in order} == {(), (0,), (1,)}
    assert _padding(cache, order, 16) < 0.5 * _padding(cache, plain.epoch_order(), 16)
    grouped.set_epoch(1)
    assert grouped.epoch_order() != order

    # The dataset renders what the sampler drew: the caption, or the drawn conversation.
    index, visit = next(item for item in order if item[1] == (1,))
    assert cache[(index, visit)]["conversation"] is cache.conversations[index][1]
    index, visit = next(item for item in order if item[1] == ())
    assert cache[(index, visit)]["conversation"] is None  # the collator renders the caption
    assert "conversation" not in cache[index]


def test_group_by_length_keeps_full_batches_and_a_partial_one_last():
    items = list(range(37))
    ordered = group_by_length(items, lambda item: -item, 4, 3, random.Random(0))
    assert sorted(ordered) == items
    batches = [ordered[i : i + 4] for i in range(0, 36, 4)]
    for batch in batches:  # each batch from one sorted run of 12: alike lengths
        assert max(batch) - min(batch) == 3 and len({item // 12 for item in batch}) == 1
    assert ordered[-1] == 36  # the partial batch (dropped by drop_last) stays at the end


def test_a_resumed_epoch_continues_with_the_same_visits():
    cache = _cache(96)
    picker = ConversationPicker(3, caption_share=0.3)

    def loader() -> ResumableDataLoader:
        sampler = VisitSampler(cache, picker, batch_size=8, group_batches=4, seed=5)
        return ResumableDataLoader(cache, batch_size=8, sampler=sampler, drop_last=True, collate_fn=list)

    full = [[(s["key"], s["conversation"] is None) for s in batch] for batch in loader()]
    first = loader()
    seen = []
    for batch in first:
        seen.append([(s["key"], s["conversation"] is None) for s in batch])
        if len(seen) == 5:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [[(s["key"], s["conversation"] is None) for s in batch] for batch in resumed]
    assert seen + rest == full


def test_length_grouping_needs_the_in_memory_cache():
    with pytest.raises(ConfigError, match="data.length_group_batches.*cache_features"):
        CaptionDataModule("a.tar", None, lambda image: image, collator=None, length_group_batches=8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device-resident"):
        CaptionDataModule(
            "a.tar",
            None,
            lambda image: image,
            collator=None,  # type: ignore[arg-type]
            cache_features=True,
            vision=torch.nn.Linear(1, 1),  # type: ignore[arg-type]
            device_resident=True,
            length_group_batches=8,
        )
