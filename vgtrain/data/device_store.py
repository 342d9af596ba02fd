"""Training data that lives on the training device: cached features and pre-tokenised captions.

With cached features (``data.cache_features`` or ``data.use_cached_features``) a training batch
needs no image decoding and no vision forward pass, so what is left of the data work per step is
Python: per-sample dicts, re-tokenising each caption, a loop over rows to pad and label them,
stacking the features and copying the batch to the device. ``data.device_resident=true`` does all
of that once, at the start: the features (in the training precision's dtype; only those the
adapter reads) and the tokenised captions become tensors on the device, and a batch is an index
into them. Per step the host builds one index tensor (the sampler's, shuffled by seed and epoch);
everything else is a handful of gathers on the device, with shapes the host already knows, so
nothing is read back.

The layout is the collator's (:class:`~vgtrain.data.collate.CaptionCollator`): prompt, caption,
EOS, right-padded to the batch's longest; labels on caption and EOS only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vgtrain.data.collate import IGNORE_INDEX, CaptionCollator
from vgtrain.data.feature_cache import CachedFeatures


class DeviceFeatureStore(Dataset):
    """``store[indices]`` (a CPU index tensor, or its list) is a whole training batch on the device.

    ``needs``: the features the adapter reads (``"pooled"``, ``"tokens"``); the other is left out
    of device memory and handed over as an empty ``[batch, 0]`` tensor.
    """

    def __init__(
        self,
        cache: CachedFeatures,
        collator: CaptionCollator,
        *,
        needs: set[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device, self.keys, self.skipped = device, cache.keys, dict(cache.skipped)
        self.prefix_length = collator.prefix_length
        self.prompt_length = len(collator.prompt_ids)
        tokenizer = collator.tokenizer
        captions = tokenizer(list(cache.captions), add_special_tokens=False).input_ids
        sequences = [
            collator.prompt_ids + ids[: collator.max_caption_tokens] + [tokenizer.eos_token_id]
            for ids in captions
        ]
        # Host copies of the lengths: the host sizes each batch without reading the device.
        self.lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        width = int(self.lengths.max())
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
        self.input_ids = input_ids.to(device)
        self.caption_counts = (self.lengths - self.prompt_length).to(device)  # caption + EOS tokens
        self.lengths_on_device = self.lengths.to(device)
        self.pooled = cache.pooled.to(device=device, dtype=dtype) if "pooled" in needs else None
        self.tokens = cache.tokens.to(device=device, dtype=dtype) if "tokens" in needs else None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        # The DataLoader's batched fetch: the indices are the batch; __getitem__ is never used.
        return torch.as_tensor(indices, dtype=torch.long)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.as_tensor([index], dtype=torch.long)

    def nbytes(self) -> int:
        tensors = (self.input_ids, self.caption_counts, self.lengths_on_device, self.pooled, self.tokens)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        """The collated batch of the samples at ``indices`` (CPU), built on the device."""
        lengths = self.lengths[indices]
        width = int(lengths.max())  # host values: no device read
        count = int(lengths.sum()) - self.prompt_length * len(indices)  # caption tokens carrying loss
        size = len(indices)
        index = indices.to(self.device, non_blocking=True)
        input_ids = self.input_ids.index_select(0, index)[:, :width]
        positions = torch.arange(width, device=self.device)
        attention_mask = (positions < self.lengths_on_device.index_select(0, index).unsqueeze(1)).long()
        # Loss positions, flat in [batch, prefix + width - 1]: row r's caption tokens (and EOS)
        # sit at prefix + prompt + j and are predicted from one position earlier.
        counts = self.caption_counts.index_select(0, index)
        rows = torch.repeat_interleave(torch.arange(size, device=self.device), counts, output_size=count)
        starts = torch.cumsum(counts, 0) - counts
        offsets = torch.arange(count, device=self.device) - starts.index_select(0, rows)
        grid = self.prefix_length + width - 1
        loss_index = rows * grid + (self.prefix_length + self.prompt_length - 1) + offsets
        loss_targets = input_ids[rows, self.prompt_length + offsets]
        labels = torch.full(
            (size, self.prefix_length + width), IGNORE_INDEX, dtype=torch.long, device=self.device
        )
        labels.view(-1).index_copy_(0, loss_index + rows + 1, loss_targets)  # the grid row is one shorter
        empty = torch.empty(size, 0, device=self.device)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "loss_index": loss_index,
            "loss_targets": loss_targets,
            "visual_pooled": self.pooled.index_select(0, index) if self.pooled is not None else empty,
            "visual_tokens": self.tokens.index_select(0, index) if self.tokens is not None else empty,
            "keys": _Keys(self.keys, indices),
        }


class _Keys:
    """A batch's sample keys, looked up only when read (the guard reads them when a step is bad).
    Not a ``Sequence`` on purpose: Lightning rebuilds sequences element by element when it moves
    a batch to the device."""

    def __init__(self, keys: Sequence[str], indices: torch.Tensor) -> None:
        self._keys, self._indices = keys, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [self._keys[int(i)] for i in self._indices[item]]
        return self._keys[int(self._indices[item])]

    def __iter__(self) -> Iterator[str]:
        return (self._keys[int(i)] for i in self._indices)


def gather_cached(batches: Iterable[dict[str, Any]], description: str) -> CachedFeatures:
    """The features ``vgtrain cache`` stored, read from collated batches into one in-memory cache
    (for ``data.use_cached_features`` with ``data.device_resident``)."""
    tokens, pooled, captions, keys = [], [], [], []
    skipped: dict[str, int] = {}
    for batch in batches:
        for reason, n in batch.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
        tokens.append(batch["visual_tokens"])
        pooled.append(batch["visual_pooled"])
        captions.extend(batch["captions"])
        keys.extend(str(k) for k in batch["keys"])
    if not captions:
        raise ValueError(f"{description}: no cached samples found")
    return CachedFeatures(torch.cat(tokens), torch.cat(pooled), captions, keys, skipped)
