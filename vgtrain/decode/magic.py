"""MAGIC: CLIP-guided contrastive search (Su et al. 2022, "Language Models Can See").

At step t, over the top-k candidates v of p(v | y_<t, I)::

    score(v) = (1 - α) · p(v | y_<t, I)
               - α · max_j cos(h_v, h_j)                      (degeneration penalty)
               + β · softmax_{v' in top-k} CLIP(I, y_<t + v')[v]

h_v is the LM's last hidden state after feeding v, h_j those of every earlier real position
(visual prefix, prompt, generated tokens); CLIP(I, text) is CLIP's logit for the image and the
generated text so far. β = 0 is contrastive search. transformers has no such strategy, so this is a
loop of its own: the context's KV cache is expanded k times, the k candidates go through the LM in
one batch, and only the chosen candidate's cache row is kept (as contrastive search does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vgtrain.decode.base import Candidate, Decoding, Strategy, finish
from vgtrain.decode.lm import lm_forward, position_ids, upcast


def magic_scores(
    probs: torch.Tensor,
    candidate_hidden: torch.Tensor,
    context_hidden: torch.Tensor,
    context_mask: torch.Tensor,
    clip_logits: torch.Tensor | None,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """``[B, k]`` MAGIC scores. probs: p of each candidate; candidate_hidden ``[B, k, D]``;
    context_hidden ``[B, T, D]`` with context_mask ``[B, T]``; clip_logits ``[B, k]`` or None (β = 0)."""
    similarity = torch.einsum(
        "bkd,btd->bkt",
        F.normalize(upcast(candidate_hidden), dim=-1),
        F.normalize(upcast(context_hidden), dim=-1),
    )
    penalty = similarity.masked_fill(~context_mask.bool().unsqueeze(1), float("-inf")).amax(-1)
    score = (1 - alpha) * upcast(probs) - alpha * penalty
    if clip_logits is not None and beta != 0:
        score = score + beta * upcast(clip_logits).softmax(-1).to(score.device)
    return score


def clip_texts(tokenizer: Any, generated: list[list[int]], candidates: torch.Tensor) -> list[list[str]]:
    """The text CLIP reads for each candidate: generated tokens so far plus the candidate."""
    return [
        [tokenizer.decode(prefix + [v], skip_special_tokens=True).strip() for v in row]
        for prefix, row in zip(generated, candidates.tolist(), strict=True)
    ]


@torch.no_grad()
def magic_search(
    job: Decoding, *, top_k: int, alpha: float, beta: float, max_new_tokens: int, min_new_tokens: int = 0
) -> list[tuple[list[int], bool]]:
    """Per image: the generated tokens (before EOS) and whether EOS ended them."""
    llm, inputs = job.llm, job.inputs
    eos, pad = llm.eos_token_id, llm.tokenizer.pad_token_id
    batch, k = inputs.embeds.shape[0], top_k
    mask = inputs.attention_mask
    positions = position_ids(mask)
    with job.bind_memory(1):
        context_hidden, cache = lm_forward(llm, inputs.embeds, mask, positions, use_cache=True)
    logits = upcast(llm.logits(context_hidden[:, -1]))
    next_position = positions[:, -1:] + 1
    rows = torch.arange(batch, device=mask.device)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=mask.device)
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        top_probs, top_ids = logits.softmax(-1).topk(k, dim=-1)  # [B, k]
        cache.batch_repeat_interleave(k)
        candidate_mask = torch.cat([mask, mask.new_ones(batch, 1)], 1).repeat_interleave(k, 0)
        with job.bind_memory(k):
            candidate_hidden, cache = lm_forward(
                llm,
                llm.embed(top_ids.reshape(-1, 1)).to(inputs.embeds.dtype),
                candidate_mask,
                next_position.repeat_interleave(k, 0),
                cache=cache,
                use_cache=True,
            )
        candidate_hidden = candidate_hidden[:, -1].view(batch, k, -1)
        clip_logits = None
        if beta != 0:
            clip_logits = job.clip().similarity(
                inputs.image_embeds, clip_texts(llm.tokenizer, generated, top_ids)
            )
        score = magic_scores(top_probs, candidate_hidden, context_hidden, mask, clip_logits, alpha, beta)
        choice = score.argmax(-1)
        chosen = torch.where(finished, torch.full_like(choice, pad), top_ids[rows, choice])
        cache.batch_select_indices(rows * k + choice)  # keep the chosen candidate's row only
        chosen_hidden = candidate_hidden[rows, choice]
        context_hidden = torch.cat([context_hidden, chosen_hidden.unsqueeze(1).to(context_hidden.dtype)], 1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        next_position = next_position + 1
        logits = upcast(llm.logits(chosen_hidden))
        for row, token in enumerate(chosen.tolist()):
            if not finished[row] and token != eos:
                generated[row].append(token)
        finished |= chosen == eos
        if bool(finished.all()):
            break
    return [(tokens, bool(done)) for tokens, done in zip(generated, finished.tolist(), strict=True)]


class Magic(Strategy):
    name = "magic"
    # The paper's captioning settings: k = 45, α = 0.1, β = 2.0.
    defaults = {"top_k": 45, "alpha": 0.1, "beta": 2.0}

    def decode(self, job: Decoding, options: dict[str, Any]) -> list[list[Candidate]]:
        o = self.resolve(options)
        top_k = min(int(o["top_k"]), job.llm.vocab_size)
        rows = magic_search(
            job,
            top_k=top_k,
            alpha=float(o["alpha"]),
            beta=float(o["beta"]),
            max_new_tokens=int(o["max_new_tokens"]),
            min_new_tokens=int(o["min_new_tokens"]),
        )
        return finish(job, rows, per_image=1)
