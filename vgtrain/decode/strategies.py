"""Decoding strategies behind one interface, and their registry.

A strategy turns prepared inputs (left-padded ``[prefix; prompt]`` embeddings) into ranked
candidates per image. ``greedy``, ``beam`` and ``sample`` are transformers' ``generate`` with the
prefix as ``inputs_embeds`` (KV cache on); ``magic`` (vgtrain.decode.magic) is a loop of its own.
Adding a strategy is one class and one line in :data:`STRATEGIES`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vgtrain.decode.base import Candidate, Decoding, Strategy, finish, until_eos
from vgtrain.decode.magic import Magic

GENERATE_OPTIONS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "stop_strings": None,
    "num_return_sequences": 1,
    "rerank": None,  # "clip": order the returned sequences by CLIP image-text similarity
}


class GenerateStrategy(Strategy):
    """Shared plumbing for the strategies transformers' ``generate`` already implements."""

    sort_by_score: ClassVar[bool] = False  # beam output is ranked already; samples are not

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def expansion(self, options: dict[str, Any]) -> int:
        """How many rows ``generate`` makes of each image (the memory must be expanded alike)."""
        return int(options["num_return_sequences"])

    @torch.no_grad()
    def decode(self, job: Decoding, options: dict[str, Any]) -> list[list[Candidate]]:
        o = self.resolve(options)
        tokenizer = job.llm.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": o["max_new_tokens"],
            "min_new_tokens": o["min_new_tokens"] or None,
            "repetition_penalty": o["repetition_penalty"],
            "no_repeat_ngram_size": o["no_repeat_ngram_size"],
            "num_return_sequences": o["num_return_sequences"],
            "eos_token_id": job.llm.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **self.generate_kwargs(o),
        }
        if o["stop_strings"]:
            kwargs.update(stop_strings=list(o["stop_strings"]), tokenizer=tokenizer)
        with job.bind_memory(self.expansion(o)):
            sequences = job.llm.model.generate(
                inputs_embeds=job.inputs.embeds, attention_mask=job.inputs.attention_mask, **kwargs
            )
        rows = [until_eos(row, job.llm.eos_token_id) for row in sequences.tolist()]
        return finish(
            job, rows, o["num_return_sequences"], o["stop_strings"], o["rerank"], self.sort_by_score
        )


class Greedy(GenerateStrategy):
    name = "greedy"
    defaults = dict(GENERATE_OPTIONS)

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}


class Beam(GenerateStrategy):
    name = "beam"
    defaults = {**GENERATE_OPTIONS, "num_beams": 4, "length_penalty": 1.0, "early_stopping": False}

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "do_sample": False,
            "num_beams": options["num_beams"],
            "length_penalty": options["length_penalty"],
            "early_stopping": options["early_stopping"],
        }

    def expansion(self, options: dict[str, Any]) -> int:
        return int(options["num_beams"])


class Sample(GenerateStrategy):
    name = "sample"
    sort_by_score = True
    defaults = {**GENERATE_OPTIONS, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": None}

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "do_sample": True,
            "num_beams": 1,
            "temperature": options["temperature"],
            "top_k": options["top_k"],
            "top_p": options["top_p"],
        }

    def decode(self, job: Decoding, options: dict[str, Any]) -> list[list[Candidate]]:
        seed = options.get("seed")
        if seed is None:
            return super().decode(job, options)
        device = job.inputs.embeds.device
        # A private RNG stream: the same seed gives the same samples, and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(seed))
            return super().decode(job, options)


STRATEGIES: dict[str, type[Strategy]] = {
    "greedy": Greedy,
    "beam": Beam,
    "sample": Sample,
    "magic": Magic,
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]()
