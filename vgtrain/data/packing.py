"""Sequence packing (``data.pack_length``): several samples' sequences share one row of the batch,
each attending only to itself.

A batch of conversations and captions mixes lengths (a caption ~10 tokens, a two-turn dialogue
~30, each behind its visual prefix); padding every row to the longest spends about a third of the
LM's positions on padding in the VQA demo. Packing places the samples first-fit-decreasing into
rows of ``pack_length`` positions. The batch keeps its samples and their images (the mapper still
sees one image per sample); only the rows change. The model gathers each row's input embeddings
from the text embeddings and the samples' visual prefixes (``pack_index``), positions restart at
0 in each sample (``pack_positions``), and a block-diagonal causal mask keeps samples apart
(``pack_segments``), so the loss is the unpacked batch's, to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgtrain.models.chat_template import EncodedConversation
from vgtrain.models.lm_loss import IGNORE_INDEX, caption_positions


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows holding at most ``capacity`` in all, first-fit
    decreasing: longest first, each into the first row with room. One longer than ``capacity``
    gets a row of its own (it is never cut here)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[item] <= free:
                rows[row].append(item)
                room[row] -= lengths[item]
                break
        else:
            rows.append([item])
            room.append(capacity - lengths[item])
    return rows


def pack_encoded(
    encoded: Sequence[EncodedConversation], prefix_length: int, capacity: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The packed batch of ``encoded`` samples (sample ``i`` reads the ``i``-th image's prefix).

    ``input_ids``/``attention_mask`` [rows, text]: each row's text tokens, sample after sample.
    ``pack_index`` [rows, length]: where each position's embedding comes from, in the text
    embeddings flattened (``row * text + t``) followed by the prefixes flattened
    (``rows * text + sample * prefix_length + k``). ``pack_positions``: the position within its
    sample. ``pack_segments``: the sample's place in its row, -1 for padding. ``labels`` and
    ``loss_index``/``loss_targets`` are laid out over ``[rows, length]`` as the unpacked
    collator lays them out over one sample's row.
    """
    lengths = [prefix_length + len(item.ids) for item in encoded]
    rows = first_fit_rows(lengths, capacity)
    text = max(sum(len(encoded[i].ids) for i in row) for row in rows)
    length = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full((len(rows), text), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), text), dtype=torch.long)
    index = torch.zeros(shape, dtype=torch.long)  # padding reads any embedding: it is masked
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    prefix_base = len(rows) * text
    for r, row in enumerate(rows):
        start, text_start = 0, 0  # this sample's first position in the row, first text token
        for segment, sample in enumerate(row):
            item = encoded[sample]
            ids = torch.tensor(item.ids, dtype=torch.long)
            count = len(ids)
            input_ids[r, text_start : text_start + count] = ids
            attention_mask[r, text_start : text_start + count] = 1
            # Text token j sits at j before the image, j + prefix after it (as unpacked).
            at = torch.arange(count)
            at = start + torch.where(at < item.image_index, at, at + prefix_length)
            index[r, at] = r * text + text_start + torch.arange(count)
            image = start + item.image_index
            index[r, image : image + prefix_length] = (
                prefix_base + sample * prefix_length + torch.arange(prefix_length)
            )
            end = start + lengths[sample]
            positions[r, start:end] = torch.arange(lengths[sample])
            segments[r, start:end] = segment
            keep = torch.tensor(item.loss_mask, dtype=torch.bool)
            if keep.any() and int(at[keep].min()) == start:
                raise ValueError("a sample's first position carries a label: packing would predict it")
            labels[r, at[keep]] = ids[keep]
            start, text_start = end, text_start + count
    loss_index, loss_targets = caption_positions(labels)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_index": loss_index,
        "loss_targets": loss_targets,
        "pack_index": index,
        "pack_positions": positions,
        "pack_segments": segments,
    }
