"""Grounding loss: the LLM's output at a visual token names what the image shows there.

A sample's ``.json`` may carry ``regions``: ``[{"box": [x0, y0, x1, y1], "words": ["red",
"circle"]}]``, the box in fractions of the image's width and height (0..1, origin top left, as the
vision tower sees the image). With ``model.grounding.weight`` > 0 the training loss adds, at every
visual token whose grid cell the box overlaps, the cross-entropy of the LM head's prediction there
against each of the region's word tokens (Kosmos-2 and Shikra ground phrases to boxes in text;
this grounds them in the visual tokens themselves). The prefix then holds word-like tokens ("this
token shows a red circle"), so "What colour is the circle?" becomes a look-up the LLM already
knows from text: find the token that says "circle", read its colour. ``model.grounding.layer=k``
reads block k's output through the LLM's final norm (the logit lens) instead of the LLM's output,
leaving the blocks above free to use what the tokens name. Training-only: exports and decoding
are unchanged. Needs a prefix of one embedding per visual token (the projector, or the
transformer mapper with ``output=inputs``), so that prefix position j is grid cell j.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from vgtrain.models.lm_loss import IGNORE_INDEX


class RegionError(ValueError):
    """A sample's ``regions`` are malformed (the message says how)."""


class Region(NamedTuple):  # a tuple: batches holding regions travel through Lightning as they are
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in fractions of the image
    words: tuple[str, ...]


def read_regions(raw: Any) -> list[Region]:
    """The ``regions`` list of a sample's JSON, checked; raises :class:`RegionError`."""
    if not isinstance(raw, list):
        raise RegionError(f"regions must be a list, got {type(raw).__name__}")
    regions = []
    for i, item in enumerate(raw):
        box, words = (item.get("box"), item.get("words")) if isinstance(item, dict) else (None, None)
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            raise RegionError(f"regions[{i}].box must be [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise RegionError(f"regions[{i}].box {box} must lie in [0, 1] with x0 < x1 and y0 < y1")
        if not (isinstance(words, list) and words and all(isinstance(w, str) and w.strip() for w in words)):
            raise RegionError(f"regions[{i}].words must be a non-empty list of words, got {words!r}")
        regions.append(Region((x0, y0, x1, y1), tuple(w.strip() for w in words)))
    return regions


def covered_cells(box: tuple[float, float, float, float], grid: tuple[int, int]) -> list[int]:
    """Row-major indices of the ``grid`` (rows, columns) cells the box overlaps (by more than an
    edge)."""
    rows, cols = grid
    x0, y0, x1, y1 = box
    col_range = range(int(x0 * cols), min(cols - 1, int(x1 * cols - 1e-9)) + 1)
    row_range = range(int(y0 * rows), min(rows - 1, int(y1 * rows - 1e-9)) + 1)
    return [r * cols + c for r in row_range for c in col_range]


class GroundingTargets:
    """A sample's regions -> ``[cells, max_targets]`` token ids for its visual tokens (the
    words' tokens, as they follow a space in text), :data:`IGNORE_INDEX` where none."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, grid: tuple[int, int], max_targets: int = 4
    ) -> None:
        if max_targets < 1:
            raise ValueError(f"model.grounding.max_targets must be >= 1, got {max_targets}")
        self.tokenizer, self.grid, self.max_targets = tokenizer, grid, max_targets
        self._ids: dict[str, list[int]] = {}

    def word_ids(self, word: str) -> list[int]:
        if word not in self._ids:
            self._ids[word] = self.tokenizer(" " + word, add_special_tokens=False).input_ids
        return self._ids[word]

    def __call__(self, regions: list[Region]) -> torch.Tensor:
        cells: list[list[int]] = [[] for _ in range(self.grid[0] * self.grid[1])]
        for region in regions:
            ids = [i for word in region.words for i in self.word_ids(word)]
            for cell in covered_cells(region.box, self.grid):
                cells[cell] += [i for i in ids if i not in cells[cell]]
        targets = torch.full((len(cells), self.max_targets), IGNORE_INDEX, dtype=torch.long)
        for cell, ids in enumerate(cells):
            kept = ids[: self.max_targets]  # a cell of several regions keeps the first ones
            targets[cell, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        return targets


def grounding_loss(
    hidden: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy of the LM head at the visual positions (``hidden``: [batch, cells, d])
    against each of their targets ([batch, cells, k]); 0 where no cell has a target."""
    logits = F.linear(hidden, head_weight, head_bias).float()
    log_probs = logits.log_softmax(-1)
    valid = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0))
    return -(picked * valid).sum() / valid.sum().clamp(min=1)
