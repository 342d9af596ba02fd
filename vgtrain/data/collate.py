"""Collation: images and captions -> one batch with labels aligned to [prefix; prompt; caption]."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vgtrain.models.prefix_lm import caption_positions, prompt_token_ids

IGNORE_INDEX = -100


class CaptionCollator:
    """Tokenises captions after a fixed prompt (see ``prompt_token_ids``), appends EOS, right-pads.

    ``labels`` spans ``prefix_length + text_length`` positions and is ``IGNORE_INDEX`` on the
    visual prefix, the prompt and padding: the loss sees caption tokens and EOS only.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prefix_length: int,
        prompt: str = "",
        max_caption_tokens: int = 40,
    ) -> None:
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an EOS and a pad token to build caption batches")
        self.tokenizer = tokenizer
        self.prefix_length = prefix_length
        self.prompt = prompt
        self.prompt_ids = prompt_token_ids(tokenizer, prompt, prefix_length)
        self.max_caption_tokens = max_caption_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [sample["caption"] for sample in samples]
        caption_ids = self.tokenizer(captions, add_special_tokens=False).input_ids
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sequences = [self.prompt_ids + ids[: self.max_caption_tokens] + [eos] for ids in caption_ids]
        length = max(len(seq) for seq in sequences)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, self.prefix_length + length), IGNORE_INDEX, dtype=torch.long)
        start = self.prefix_length + len(self.prompt_ids)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            caption_part = seq[len(self.prompt_ids) :]
            labels[row, start : start + len(caption_part)] = torch.tensor(caption_part)
        # The caption positions as index tensors, computed here on the CPU so that the training
        # step picks them out with no boolean-mask indexing (no host sync on an accelerator).
        loss_index, loss_targets = caption_positions(labels)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "loss_index": loss_index,
            "loss_targets": loss_targets,
            "captions": captions,
            "keys": [sample.get("key") for sample in samples],
        }
        if any("references" in sample for sample in samples):  # several captions per image
            batch["references"] = [sample.get("references", [sample["caption"]]) for sample in samples]
        if "image" in samples[0]:
            batch["pixel_values"] = torch.stack([sample["image"] for sample in samples])
        if "tokens" in samples[0]:  # precomputed visual features (see data/feature_cache.py)
            batch["visual_tokens"] = torch.stack([sample["tokens"] for sample in samples])
            batch["visual_pooled"] = torch.stack([sample["pooled"] for sample in samples])
        return batch
