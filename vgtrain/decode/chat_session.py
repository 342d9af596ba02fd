"""A conversation about one image, turn after turn, with the KV cache kept between turns.

Each turn renders the whole history with the training template (so the prompt is exactly what
training saw), then feeds the LLM only the tokens its cache does not hold yet: the cache covers
the longest common prefix of the new rendering and the tokens fed so far (normally everything up
to the last answer; it is cropped where the re-tokenised answer differs from the generated
tokens). Greedy decoding; ``VisualDecoder.chat`` serves every other strategy without a cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vgtrain.decode.chat import conversation_inputs, renderer_for
from vgtrain.decode.images import open_image
from vgtrain.decode.lm import lm_forward
from vgtrain.models.chat_template import EncodedConversation, stop_token_ids


class ChatSession:
    """``ask(text)`` -> the answer; ``history`` holds the turns; ``set_image`` switches the image
    (the text history stays), ``reset`` forgets the history."""

    def __init__(self, decoder: Any, image: Image.Image | str | Path, *, max_new_tokens: int = 48) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.renderer = renderer_for(decoder)
        self.stop_ids = set(stop_token_ids(self.model.llm.tokenizer))
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []
        self.reused_tokens = 0  # tokens the last turn did not have to feed again (for tests, logs)
        self.set_image(image)

    def set_image(self, image: Image.Image | str | Path) -> None:
        pixels = self.model.vision.transform(open_image(image)).unsqueeze(0).to(self.decoder.device)
        with torch.no_grad():
            self.features = self.model.vision.encode(pixels)
        self._forget_cache()

    def reset(self) -> None:
        self.history = []
        self._forget_cache()

    def _forget_cache(self) -> None:
        self.cache: Any = None
        self.fed: list[int] = []  # text tokens whose keys/values the cache holds (prefix apart)
        self.image_index = -1

    @torch.no_grad()
    def ask(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        encoded = self.renderer.encode(self.history, add_generation_prompt=True)
        answer = self._generate(encoded)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.decoder.device).unsqueeze(0)

    def _step(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Feeds ``embeds`` at cache positions ``start``..; returns the last position's logits."""
        mask = torch.ones(1, start + embeds.shape[1], dtype=torch.long, device=embeds.device)
        with self.model.visual_context(self.features):
            hidden, self.cache = lm_forward(
                self.model.llm,
                embeds,
                mask,
                self._positions(start, embeds.shape[1]),
                self.cache,
                use_cache=True,
            )
        return self.model.llm.logits(hidden[:, -1])

    def _generate(self, encoded: EncodedConversation) -> str:
        prefix = self.model.prefix_length
        common = 0
        if self.cache is not None and encoded.image_index == self.image_index:
            limit = min(len(self.fed), len(encoded.ids))
            while common < limit and self.fed[common] == encoded.ids[common]:
                common += 1
        if common <= encoded.image_index or common == len(encoded.ids):
            # Nothing (or not even the image) to reuse, or nothing new to feed: start over.
            self._forget_cache()
            embeds, _ = conversation_inputs(self.model, self.features, [encoded])
            logits = self._step(embeds, 0)
            self.reused_tokens = 0
        else:
            # Text token j sits at j + prefix after the image. A negative crop removes that many
            # positions in every transformers version (older ones read a positive one as a length).
            surplus = self.cache.get_seq_length() - (common + prefix)
            if surplus > 0:
                self.cache.crop(-surplus)
            new = torch.tensor([encoded.ids[common:]], device=self.decoder.device)
            logits = self._step(self.model.llm.embed(new), common + prefix)
            self.reused_tokens = common
        self.fed = list(encoded.ids)
        self.image_index = encoded.image_index
        generated: list[int] = []
        for _ in range(self.max_new_tokens):
            token = int(logits.argmax(-1))
            generated.append(token)
            if token in self.stop_ids:
                break
            start = len(self.fed) + prefix
            self.fed.append(token)
            logits = self._step(
                self.model.llm.embed(torch.tensor([[token]], device=self.decoder.device)), start
            )
        return self.model.llm.tokenizer.decode(generated, skip_special_tokens=True).strip()
