"""The output head and cross-entropy over caption positions only, three ways.

Position ``t`` of the sequence predicts token ``t + 1``; only caption tokens (and EOS) carry loss.
The positions arrive as a flat index into the ``[batch, length - 1]`` grid, computed by the
collator (or the device-resident store) where the caption lengths are known, so picking them out
is an ``index_select`` of a known size: no boolean-mask indexing, no host synchronisation.

- ``torch``: head on the selected positions, ``F.cross_entropy`` in fp32. Fewest ops, best for
  small vocabularies and CPU.
- ``chunked``: head and cross-entropy fused per chunk of positions, with the gradient computed in
  the forward pass (as liger-kernel's fused linear cross-entropy does): the ``[tokens x vocab]``
  logits never exist in fp32 all at once, only a chunk of them. For large batches x vocabularies.
- ``liger``: liger-kernel's Triton kernel (CUDA, optional dependency ``liger-kernel``).

``auto`` picks ``liger`` on CUDA when installed, else ``chunked`` on CUDA, else ``torch``.

The mean runs over tokens (``token``: a caption of 20 tokens weighs 20 one-word answers) or over
samples (``sample``: each sample's tokens share one sample's weight, as when every sample's own
loss is averaged first), chosen by ``model.loss_reduction``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_IMPLEMENTATIONS = ("auto", "torch", "chunked", "liger")
LOSS_REDUCTIONS = ("token", "sample")
# Logit elements per chunk of the chunked loss: 2^27 fp32 values = 512 MiB.
CHUNK_ELEMENTS = 2**27


@dataclass
class CaptionLoss:
    loss: torch.Tensor  # mean cross-entropy over the caption positions
    num_correct: torch.Tensor | None  # positions whose target logit is the largest (None: not computed)


def caption_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, targets)`` of the positions that predict a labelled token: ``index`` is flat in
    the ``[batch, length - 1]`` grid. Reads ``labels``' values (a host sync on an accelerator):
    collators call it on the CPU, before the batch moves."""
    targets = labels[:, 1:]
    index = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(-1)
    return index, targets.flatten().index_select(0, index)


def sample_mean_weights(sample: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, count)`` for the mean over samples: ``sample`` names each loss position's sample
    (``0 <= sample < num_samples``); a position's weight is ``1 / (its sample's positions x the
    samples with any)``, so the weights sum to 1. ``count``: those samples. No host sync."""
    ones = torch.ones(sample.shape, dtype=torch.float32, device=sample.device)
    per_sample = torch.zeros(num_samples, dtype=torch.float32, device=sample.device).index_add_(
        0, sample, ones
    )
    count = (per_sample > 0).sum()
    return 1.0 / (per_sample[sample] * count.clamp(min=1)), count


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_implementation(name: str, device: torch.device, weighted: bool = False) -> str:
    if name not in LOSS_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown LM loss implementation {name!r}; choose from {', '.join(LOSS_IMPLEMENTATIONS)}"
        )
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        return "liger" if liger_available() and not weighted else "chunked"
    if name == "liger" and weighted:
        raise ValueError(
            "the liger LM loss averages over tokens only; with model.loss_reduction=sample use "
            "model.speed.lm_loss=chunked or auto"
        )
    if name == "liger" and (device.type != "cuda" or not liger_available()):
        raise ValueError(
            "the liger LM loss needs a CUDA device and the liger-kernel package (pip install liger-kernel); "
            "use model.lm_loss=chunked or auto"
        )
    return name


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul in here (``dtype`` when autocast is off)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def caption_loss(
    hidden: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    implementation: str = "auto",
    with_accuracy: bool = True,
    position_weights: torch.Tensor | None = None,
) -> CaptionLoss:
    """Mean cross-entropy of ``hidden[:, :-1]`` at ``index`` (see :func:`caption_positions`)
    under the output head ``(weight, bias)`` against ``targets``; with ``position_weights``
    (summing to 1, e.g. :func:`sample_mean_weights`) their weighted sum instead."""
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    selected = flat.index_select(0, index)
    how = resolve_implementation(implementation, hidden.device, weighted=position_weights is not None)
    if how == "torch":
        logits = F.linear(selected, weight, bias)
        if position_weights is None:
            loss = F.cross_entropy(logits.float(), targets)
        else:
            loss = (F.cross_entropy(logits.float(), targets, reduction="none") * position_weights).sum()
        correct = _num_correct(logits.detach(), targets) if with_accuracy else None
        return CaptionLoss(loss, correct)
    if how == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        dtype = compute_dtype(hidden.device, weight.dtype)
        loss = liger_fused_linear_cross_entropy(
            selected.to(dtype), weight.to(dtype), targets, bias.to(dtype) if bias is not None else None
        )
        correct = None
        if with_accuracy:
            with torch.no_grad():
                correct = _num_correct(F.linear(selected.detach(), weight, bias), targets)
        return CaptionLoss(loss, correct)
    dtype = compute_dtype(hidden.device, weight.dtype)
    if position_weights is None:
        position_weights = torch.full(targets.shape, 1.0 / max(targets.numel(), 1), device=targets.device)
    loss, correct = _ChunkedHeadCrossEntropy.apply(selected, weight, bias, targets, position_weights, dtype)
    return CaptionLoss(loss, correct if with_accuracy else None)


def _num_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # "argmax == target" as "the target's logit is the largest": a max reduction is ~10x
    # cheaper than argmax on CPU, which with a 50k vocabulary was ~2% of a GPT-2-small step.
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (target_logit >= logits.amax(-1)).sum()


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Head + weighted cross-entropy (``position_weights`` sum to 1: a mean), chunk by chunk, with
    the gradients made in the forward pass (the chunk's logits are freed at once); backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        position_weights: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = hidden.shape[0]
        needs_grad = any(ctx.needs_input_grad[:3])  # grad mode is off inside forward itself
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # cast once, not once per chunk
            h = hidden.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            chunk = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
            for start in range(0, count, chunk):
                rows = h[start : start + chunk]
                wanted = targets[start : start + chunk]
                scale = position_weights[start : start + chunk].float()
                logits = F.linear(rows, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
                total += ((lse - target_logit) * scale).sum()
                correct += (target_logit >= logits.amax(-1)).sum()
                if not needs_grad:
                    continue
                # d(weighted CE)/d(logits) = (softmax - onehot) * weight, in place of the logits.
                grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_()
                grad_logits.scatter_add_(
                    -1, wanted.unsqueeze(-1), torch.full_like(target_logit, -1.0).unsqueeze(-1)
                )
                grad_logits = grad_logits.mul_(scale.unsqueeze(-1)).to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ rows).float()
                if grad_bias is not None:
                    grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None):  # type: ignore[override]
        saved = ctx.saved_tensors
        grads = [
            (g * grad_loss).to(dtype) if has else None
            for g, has, dtype in zip(saved, ctx.has, ctx.dtypes, strict=True)
        ]
        return grads[0], grads[1], grads[2], None, None, None
