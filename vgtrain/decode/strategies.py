"""Decoding strategies behind one interface, and their registry.

A strategy turns prepared inputs (left-padded ``[prefix; prompt]`` embeddings) into ranked
candidates per image. ``greedy``, ``beam`` and ``sample`` run vgtrain's lean loops over a static KV
cache (vgtrain.decode.search, the same tokens as transformers' ``generate``) for GPT-2- and
Llama-family LLMs; for other LLMs, or options only ``generate`` implements (repetition penalty,
n-gram blocking, stop strings), they call ``generate`` with the prefix as ``inputs_embeds``.
``magic`` (vgtrain.decode.magic) is a loop of its own. Adding a strategy is one class and one
line in :data:`STRATEGIES`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vgtrain.decode.base import Candidate, Decoding, Strategy, finish, until_eos
from vgtrain.decode.magic import Magic
from vgtrain.decode.search import Limits, beam_search, sample_or_greedy
from vgtrain.decode.static_lm import StaticLM, Step, engine, supports
from vgtrain.models.xattn import find_decoder_layers

GENERATE_OPTIONS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "stop_strings": None,
    "num_return_sequences": 1,
    "rerank": None,  # "clip": order the returned sequences by CLIP image-text similarity
    # How the static-cache loop runs its one-token step (greedy, sample): "auto" (a CUDA graph on
    # CUDA, eager elsewhere), "eager", "compile" (torch.compile) or "cuda-graph".
    "step": "auto",
}


class GenerateStrategy(Strategy):
    """Shared plumbing for the strategies transformers' ``generate`` implements: vgtrain's
    static-cache loop runs them when it can give ``generate``'s tokens (:meth:`lean`), else
    ``generate`` does."""

    sort_by_score: ClassVar[bool] = False  # beam output is ranked already; samples are not

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def expansion(self, options: dict[str, Any]) -> int:
        """How many rows ``generate`` makes of each image (the memory must be expanded alike)."""
        return int(options["num_return_sequences"])

    def search(
        self, lm: StaticLM, step: Step, embeds: torch.Tensor, limits: Limits, options: dict[str, Any]
    ) -> torch.Tensor:
        """The static-cache loop of this strategy: ``[rows, steps]`` tokens as ``generate`` gives them."""
        raise NotImplementedError

    def lean(self, job: Decoding, options: dict[str, Any]) -> bool:
        """Whether the static-cache loop can do this job exactly as ``generate`` would."""
        if supports(job.llm) is not None:
            return False
        # The loop calls the blocks' parts, not the blocks: hooks on a block run only inside
        # generate, except the cross-attention pre-hooks, which the loop runs itself.
        layers = _layers(job)
        unknown_hooks = any(layer._forward_hooks for layer in layers) or (
            job.xattn is None and any(layer._forward_pre_hooks for layer in layers)
        )
        return (
            options["repetition_penalty"] == 1.0
            and not options["no_repeat_ngram_size"]
            and not options["stop_strings"]
            and not unknown_hooks
        )

    @torch.no_grad()
    def decode(self, job: Decoding, options: dict[str, Any]) -> list[list[Candidate]]:
        o = self.resolve(options)
        sequences = self.run_static(job, o) if self.lean(job, o) else self.run_generate(job, o)
        rows = [until_eos(row, job.llm.eos_token_id) for row in sequences.tolist()]
        return finish(
            job, rows, o["num_return_sequences"], o["stop_strings"], o["rerank"], self.sort_by_score
        )

    def run_static(self, job: Decoding, o: dict[str, Any]) -> torch.Tensor:
        """Token rows from the static-cache loop (options resolved)."""
        expand = self.expansion(o)
        embeds = job.inputs.embeds.repeat_interleave(expand, 0)
        mask = job.inputs.attention_mask.repeat_interleave(expand, 0)
        limits = Limits(
            o["max_new_tokens"],
            o["min_new_tokens"] or 0,
            job.llm.eos_token_id,
            job.llm.tokenizer.pad_token_id,
        )
        with job.bind_memory(expand):
            memory = job.xattn.memory if job.xattn is not None else None
            length = mask.shape[1] + limits.max_new_tokens
            lm, step = engine(job.llm, mask, length, job.xattn, memory, self.step_mode(o))
            return self.search(lm, step, embeds, limits, o)

    def step_mode(self, options: dict[str, Any]) -> str:
        return options["step"]

    def run_generate(self, job: Decoding, o: dict[str, Any]) -> torch.Tensor:
        """Token rows from transformers' ``generate`` (options resolved)."""
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
            return job.llm.model.generate(
                inputs_embeds=job.inputs.embeds, attention_mask=job.inputs.attention_mask, **kwargs
            )


def _layers(job: Decoding) -> torch.nn.ModuleList:
    return find_decoder_layers(job.llm.model.base_model)


class Greedy(GenerateStrategy):
    name = "greedy"
    defaults = dict(GENERATE_OPTIONS)

    def generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}

    def lean(self, job: Decoding, options: dict[str, Any]) -> bool:
        return options["num_return_sequences"] == 1 and super().lean(job, options)  # else generate's error

    def search(
        self, lm: StaticLM, step: Step, embeds: torch.Tensor, limits: Limits, options: dict[str, Any]
    ) -> torch.Tensor:
        return sample_or_greedy(lm, embeds, limits, step=step)


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

    def lean(self, job: Decoding, options: dict[str, Any]) -> bool:
        # Out-of-range settings go to generate, which explains them.
        return 1 <= options["num_return_sequences"] <= options["num_beams"] and super().lean(job, options)

    def step_mode(self, options: dict[str, Any]) -> str:
        return "eager"  # the beams' cache rows are gathered each step: no fixed buffers to graph

    def search(
        self, lm: StaticLM, step: Step, embeds: torch.Tensor, limits: Limits, options: dict[str, Any]
    ) -> torch.Tensor:
        return beam_search(
            lm,
            embeds,
            limits,
            num_beams=options["num_beams"],
            length_penalty=options["length_penalty"],
            early_stopping=options["early_stopping"],
            num_return_sequences=options["num_return_sequences"],
        )


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

    def search(
        self, lm: StaticLM, step: Step, embeds: torch.Tensor, limits: Limits, options: dict[str, Any]
    ) -> torch.Tensor:
        return sample_or_greedy(
            lm,
            embeds,
            limits,
            sample=True,
            temperature=options["temperature"],
            top_k=options["top_k"],
            top_p=options["top_p"],
            step=step,
        )

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
