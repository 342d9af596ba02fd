"""Model FLOPs per training sample, and MFU = achieved model FLOP/s / measured matmul peak.

What counts (the frozen-backbone adapter step):

- the frozen LLM's forward over all ``T`` positions of the batch (prefix + prompt + caption,
  padded length as executed), and the output head on the ``P`` positions that carry loss;
- the backward pass for *activation* gradients only: the frozen weights take no gradient, so each
  frozen matmul ``Y = X W`` costs one more matmul (``dX = dY Wᵀ``), the attention products two;
- the adapter's forward and full backward (weight and input gradients);
- the frozen vision tower's forward, on rows that train from images (not on cached features).

For a GPT-2-style LM of ``L`` layers, width ``D`` and vocabulary ``V`` this is, per sample::

    forward   = L · (24·T·D² + 4·T²·D) + 2·P·D·V
    backward  = L · (24·T·D² + 8·T²·D) + 2·P·D·V          (activation gradients only)
    adapter   ≈ 6 · (adapter matmul parameters) · (positions they are applied to)

(24·T·D²: QKV, output projection and the 4x MLP; 4·T²·D: scores and weighted values.) The bench
*counts* the FLOPs of one real step with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
attention, forward and backward, exactly what autograd runs) and reports the formula beside it
as a check. MFU divides by a measured dense-matmul peak of the same machine and dtype
(:func:`vgtrain.bench.machine.matmul_peak`), not a datasheet number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.training.module import CaptioningModule


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch -> keyword arguments of ``VisualPrefixLM.forward`` (as the module's step)."""
    features = None
    if "visual_tokens" in batch:
        features = VisualFeatures(batch["visual_tokens"].to(device), batch["visual_pooled"].to(device))
    pixels = batch.get("pixel_values")
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": batch["labels"].to(device),
        "pixel_values": pixels.to(device) if pixels is not None else None,
        "features": features,
    }


def counted_flops(module: CaptioningModule, batch: dict[str, Any], device: torch.device) -> float:
    """FLOPs of one forward + backward of the module's model on ``batch`` (no optimizer step)."""
    model = module.model.to(device).train()
    with FlopCounterMode(display=False) as counter:
        model(**model_inputs(batch, device)).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def gpt2_formula_flops(
    layers: int, width: int, vocab: int, positions: int, loss_positions: int
) -> dict[str, float]:
    """The formula above for the frozen LM alone (per batch: pass totals over the batch)."""
    blocks = layers * 24 * positions * width**2
    forward = blocks + layers * 4 * positions**2 * width + 2 * loss_positions * width * vocab
    backward = blocks + layers * 8 * positions**2 * width + 2 * loss_positions * width * vocab
    return {"forward": float(forward), "backward_activations": float(backward)}


def llm_formula_for_batch(module: CaptioningModule, batch: dict[str, Any]) -> dict[str, float]:
    """The frozen-LM formula summed over the rows of ``batch`` (each row at the padded length)."""
    config = module.model.llm.model.config
    rows, text = batch["input_ids"].shape
    positions = module.model.prefix_length + text
    loss_positions = int((batch["labels"][:, 1:] != -100).sum())
    per_row = gpt2_formula_flops(config.n_layer, config.n_embd, config.vocab_size, positions, 0)
    head = 2 * loss_positions * config.n_embd * config.vocab_size
    return {
        "forward": per_row["forward"] * rows + head,
        "backward_activations": per_row["backward_activations"] * rows + head,
    }


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    return flops_per_sample * samples_per_s / peak_flops
