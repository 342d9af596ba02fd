"""Slow reference decoders: no KV cache, the full sequence is recomputed at every step.

They state the algorithms as directly as possible (one forward pass per candidate, in Python
loops) so that tests can check the cached strategies against them token for token, and so that
`vgtrain bench` has a no-cache MAGIC baseline (vgtrain/bench/decode.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgtrain.decode.base import Decoding
from vgtrain.decode.lm import lm_forward, position_ids, upcast


def _full_pass(job: Decoding, row: int, tokens: list[int]) -> torch.Tensor:
    """Last-layer hidden states of one image's real positions: prefix, prompt, then ``tokens``."""
    inputs, llm = job.inputs, job.llm
    keep = inputs.attention_mask[row].bool()
    context = inputs.embeds[row, keep]
    if tokens:
        ids = torch.tensor(tokens, dtype=torch.long, device=context.device)
        context = torch.cat([context, llm.embed(ids).to(context.dtype)])
    mask = torch.ones(1, context.shape[0], dtype=torch.long, device=context.device)
    with job.bind_memory(1, rows=[row]):
        hidden, _ = lm_forward(llm, context.unsqueeze(0), mask, position_ids(mask))
    return hidden[0]


@torch.no_grad()
def greedy_reference(job: Decoding, max_new_tokens: int) -> list[tuple[list[int], bool]]:
    """argmax p(v | y_<t, I), recomputing the whole sequence for every new token."""
    llm, results = job.llm, []
    for row in range(job.inputs.embeds.shape[0]):
        tokens: list[int] = []
        ended = False
        for _ in range(max_new_tokens):
            token = int(llm.logits(_full_pass(job, row, tokens)[-1]).argmax())
            if token == llm.eos_token_id:
                ended = True
                break
            tokens.append(token)
        results.append((tokens, ended))
    return results


@torch.no_grad()
def magic_reference(
    job: Decoding, *, top_k: int, alpha: float, beta: float, max_new_tokens: int
) -> list[tuple[list[int], bool]]:
    """MAGIC as written in the paper, one image and one candidate at a time:
    argmax_v (1-α)·p(v|y_<t,I) − α·max_j cos(h_v, h_j) + β·softmax_k CLIP(I, y_<t+v)."""
    llm, tokenizer, results = job.llm, job.llm.tokenizer, []
    for row in range(job.inputs.embeds.shape[0]):
        tokens: list[int] = []
        ended = False
        for _ in range(max_new_tokens):
            hidden = _full_pass(job, row, tokens)
            probs = upcast(llm.logits(hidden[-1])).softmax(-1)
            top_probs, top_ids = probs.topk(top_k)
            penalties, texts = [], []
            for v in top_ids.tolist():
                with_v = _full_pass(job, row, tokens + [v])
                h_v, previous = with_v[-1], with_v[:-1]
                penalties.append(
                    F.cosine_similarity(upcast(previous), upcast(h_v).unsqueeze(0), dim=-1).max()
                )
                texts.append(tokenizer.decode(tokens + [v], skip_special_tokens=True).strip())
            score = (1 - alpha) * top_probs - alpha * torch.stack(penalties)
            if beta != 0:
                clip_logits = job.clip().similarity(job.inputs.image_embeds[row : row + 1], [texts])[0]
                score = score + beta * upcast(clip_logits).softmax(-1).to(score.device)
            token = int(top_ids[score.argmax()])
            if token == llm.eos_token_id:
                ended = True
                break
            tokens.append(token)
        results.append((tokens, ended))
    return results
