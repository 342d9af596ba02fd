"""A map-style DataLoader that resumes mid-epoch at the batch where a checkpoint was taken.

Lightning saves ``state_dict()`` of every train DataLoader that has one with each checkpoint and
hands it back through ``load_state_dict()`` on resume; it also calls ``sampler.set_epoch(epoch)``
at every epoch start. The sample order of an epoch is a pure function of ``(seed, epoch)``
(DistributedSampler's permutation), so skipping the batches already consumed in the checkpointed
epoch reproduces exactly the order an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by ``seed + epoch``, split across ranks) that starts the next
    iteration of a given epoch ``skip`` indices in. Being a DistributedSampler, Lightning keeps it
    under DDP instead of wrapping it in one of its own."""

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self._skip: tuple[int, int] | None = None  # (epoch, indices of this rank to skip)

    def skip_in_epoch(self, epoch: int, count: int) -> None:
        self._skip = (epoch, count)

    def epoch_order(self) -> list[Any]:
        """This rank's items of the current epoch, in order: a pure function of (seed, epoch)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[Any]:
        items = self.epoch_order()
        if self._skip is not None and self._skip[0] == self.epoch:
            items = items[self._skip[1] :]
        self._skip = None  # applies to the first iteration after a resume only
        return iter(items)


class ResumableDataLoader(DataLoader):
    """Counts the batches it has handed out in the current epoch; that count and the epoch are its
    state. With a length (map-style), Lightning does not prefetch ahead of the training step, so
    at checkpoint time the count is exactly the number of batches trained on in this epoch."""

    def __init__(
        self, dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, **kwargs: Any
    ) -> None:
        # The generator only feeds the loader's base seed; a dedicated one keeps creating an
        # iterator from drawing on the global RNG, which a resumed run would draw at other times.
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_in_epoch = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        skip = sampler._skip
        self.batches_in_epoch = skip[1] // self.batch_size if skip and skip[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self.batches_in_epoch += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": self.batches_in_epoch}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.skip_in_epoch(state_dict["epoch"], state_dict["batches"] * self.batch_size)  # type: ignore[attr-defined]
