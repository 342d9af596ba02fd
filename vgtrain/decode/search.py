"""Greedy, sampling and beam search over :class:`~vgtrain.decode.static_lm.StaticLM`.

They reproduce transformers' ``generate`` for the options vgtrain's strategies pass (same logits
processors in the same order: min-new-tokens, temperature, top-k, top-p; the same vectorised beam
search with its finished-hypothesis bookkeeping, length penalty and early-stopping heuristic), so
greedy and beam tokens are those ``generate`` gives, and a seeded sample draws the same tokens.
What they drop is the per-token overhead: the loop checks whether every row has stopped once every
``check_every`` tokens (one host sync), and a finished row just emits padding until then.

Each returns ``[rows, steps]`` token ids laid out as ``generate`` returns them (padding after EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vgtrain.decode.static_lm import StaticLM, Step, make_step

CHECK_EVERY = 4  # tokens between "has every row stopped?" checks (each one host sync)


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    min_new_tokens: int
    eos: int
    pad: int


# Masks candidates out of a top-k. transformers adds -1e9, which a strongly negative length
# penalty (log p / length**penalty grows like 16**20) outranks; -inf stays below every real score.
NEVER = float("-inf")


def _no_eos_yet(scores: torch.Tensor, step: int, limits: Limits) -> torch.Tensor:
    """transformers' MinNewTokensLengthLogitsProcessor: EOS is impossible before min_new_tokens."""
    if step < limits.min_new_tokens:
        scores[:, limits.eos] = float("-inf")
    return scores


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p filtering, as transformers' warpers do them."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        logits = logits.masked_fill(logits < logits.topk(k)[0][..., -1:], float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(descending=False)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


@torch.no_grad()
def sample_or_greedy(
    lm: StaticLM,
    embeds: torch.Tensor,
    limits: Limits,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    step: Step | None = None,
    check_every: int = CHECK_EVERY,
) -> torch.Tensor:
    """Greedy (argmax) or multinomial sampling; ``step`` runs one token (default:
    ``make_step(lm)``, a CUDA graph on CUDA)."""
    rows, device = embeds.shape[0], embeds.device
    out = torch.full((rows, limits.max_new_tokens), limits.pad, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    indices = torch.arange(limits.max_new_tokens, device=device)  # 0-d views: no per-step tensor
    step = step or make_step(lm)
    logits = lm.logits(lm.prefill(embeds))
    for t in range(limits.max_new_tokens):
        scores = _no_eos_yet(logits, t, limits)
        if sample:
            probs = warp(scores, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(unfinished, token, limits.pad)  # a finished row emits padding
        out[:, t] = token
        unfinished &= token != limits.eos
        done = t + 1 == limits.max_new_tokens
        if done or ((t + 1) % check_every == 0 and not bool(unfinished.any())):
            return out[:, : t + 1]
        logits = step(token, indices[t])
    return out


@torch.no_grad()
def beam_search(
    lm: StaticLM,
    embeds: torch.Tensor,
    limits: Limits,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    check_every: int = CHECK_EVERY,
) -> torch.Tensor:
    """transformers' beam search (``_beam_search``, one EOS id, no sampling) on the static cache.
    ``embeds`` holds ``num_beams`` consecutive copies of each image's input."""
    rows, device = embeds.shape[0], embeds.device
    batch, beams, keep = rows // num_beams, num_beams, 2 * num_beams  # keep: top 2k so k stay open
    length = limits.max_new_tokens
    running = torch.full((batch, beams, length), limits.pad, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = NEVER  # all beams start as one hypothesis
    finished_scores = torch.full((batch, beams), NEVER, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    offset = torch.arange(batch, device=device).view(-1, 1) * beams
    indices = torch.arange(length, device=device)

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.take_along_dim(index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)

    logits = lm.logits(lm.prefill(embeds))
    for t in range(length):
        log_probs = _no_eos_yet(logits.log_softmax(-1), t, limits)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + running_scores.unsqueeze(-1)).view(batch, -1)
        top_scores, top_index = total.topk(keep)
        source = top_index // vocab
        candidates = gather(running, source)
        candidates[:, :, t] = top_index % vocab
        stops = (candidates[:, :, t] == limits.eos) | (t + 1 >= length)
        # Open beams for the next step: the best ``beams`` candidates that did not stop.
        open_scores = top_scores.masked_fill(stops, NEVER)
        chosen = open_scores.topk(beams).indices
        running, running_scores = gather(candidates, chosen), gather(open_scores, chosen)
        # Finished hypotheses: merge the candidates that just stopped among the top ``beams``.
        just_finished = stops & top_beams
        normalised = top_scores / ((t + 1) ** length_penalty)
        full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        normalised = normalised.masked_fill(full | ~improvable | ~just_finished, NEVER)
        merged_scores = torch.cat((finished_scores, normalised), 1)
        best = merged_scores.topk(beams).indices
        finished = gather(torch.cat((finished, candidates), 1), best)
        finished_scores = gather(merged_scores, best)
        is_finished = gather(torch.cat((is_finished, just_finished), 1), best)
        if t + 1 == length:
            break
        # The early-stopping heuristic of transformers' _check_early_stop_heuristic.
        hypothetical = length if early_stopping == "never" and length_penalty > 0 else t + 1
        best_running = running_scores[:, :1] / (hypothetical**length_penalty)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEVER)
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        if (t + 1) % check_every == 0:
            going = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~stops.all()
            if not bool(going):
                break
        lm.reorder((offset + gather(source, chosen)).view(-1))
        token = running[:, :, t].reshape(-1)
        logits = lm.logits(lm.step(lm.embed(token), indices[t]))
    return finished[:, :num_return_sequences].reshape(batch * num_return_sequences, length)
