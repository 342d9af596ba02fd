"""The hand-written baseline: ClipCap's training loop (Mokady et al. 2021, ``train.py``), prefix-only
mode, in plain PyTorch. No Lightning, no callbacks, no gradient clipping, no logging.

Per step: cached CLIP embedding -> MLP -> prefix; ``[prefix; wte(tokens)]`` through GPT-2 with
the LM head on every position ("full-sequence" logits); cross-entropy on the caption positions;
``zero_grad``, ``backward``, AdamW ``step``, scheduler ``step``. It runs on the same frozen GPT-2
module, the same batches (the same in-memory feature cache and collator) and the same batch size
and precision as vgtrain's step, so the ratio of the two is the overhead (or saving) of vgtrain's stack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from vgtrain.bench.machine import DTYPES, PeakMemory, synchronize
from vgtrain.bench.steps import LEARNING_RATE, WARMUP_STEPS, Timing

IGNORE_INDEX = -100


class ClipCaptionPrefix(nn.Module):
    """ClipCap's ``ClipCaptionPrefix``: a trainable MLP in front of a frozen GPT-2."""

    def __init__(self, gpt: nn.Module, prefix_length: int, prefix_size: int) -> None:
        super().__init__()
        self.gpt = gpt  # shared with vgtrain's model: same frozen weights, no copy
        self.prefix_length = prefix_length
        self.gpt_embedding_size = gpt.get_input_embeddings().weight.shape[1]
        hidden = self.gpt_embedding_size * prefix_length // 2
        self.clip_project = nn.Sequential(
            nn.Linear(prefix_size, hidden),
            nn.Tanh(),
            nn.Linear(hidden, self.gpt_embedding_size * prefix_length),
        )

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embedding_text = self.gpt.get_input_embeddings()(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)
        embedding_cat = torch.cat((prefix_projections.to(embedding_text.dtype), embedding_text), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask).logits


def _batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:  # epochs back to back, as the Lightning run does
        yield from loader


def time_loop(
    gpt: nn.Module,
    cache: Dataset,
    collate: Any,
    *,
    prefix_length: int,
    batch_size: int,
    warmup_steps: int,
    timed_steps: int,
    dtype: str,
    device: torch.device,
    seed: int = 0,
) -> Timing:
    """Runs ClipCap's loop for ``warmup + timed`` steps; times the timed ones (batch end to batch end)."""
    prefix_size = cache[0]["pooled"].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClipCaptionPrefix(gpt, prefix_length, prefix_size).to(device)
    model.gpt.eval()  # prefix-only mode: GPT-2 frozen, as ClipCap's --only_prefix
    model.gpt.requires_grad_(False)
    model.clip_project.train()
    optimizer = torch.optim.AdamW(model.clip_project.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    loader = DataLoader(
        cache,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
    )
    ends: list[float] = []
    cpu_ends: list[float] = []
    with PeakMemory(device) as memory:
        for step, batch in enumerate(_batches(loader)):
            if step == warmup_steps + timed_steps:
                break
            tokens = batch["input_ids"].to(device)
            prefix = batch["visual_pooled"].to(device)
            text_mask = batch["attention_mask"].to(device)
            mask = torch.cat([text_mask.new_ones(text_mask.shape[0], prefix_length), text_mask], dim=1)
            targets = batch["labels"][:, prefix_length:].to(device)  # caption tokens + EOS, -100 elsewhere
            with autocast:
                logits = model(tokens, prefix, mask)[:, prefix_length - 1 : -1]
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), targets.flatten(), ignore_index=IGNORE_INDEX
                )
            model.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            synchronize(device)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
    steps = [b - a for a, b in zip(ends[warmup_steps - 1 :], ends[warmup_steps:], strict=False)]
    cpu = [b - a for a, b in zip(cpu_ends[warmup_steps - 1 :], cpu_ends[warmup_steps:], strict=False)]
    added = memory.peak_bytes - memory.start_bytes
    return Timing(batch_size, steps, [], cpu, memory.peak_bytes, memory.kind, added)
