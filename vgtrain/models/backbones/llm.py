"""Causal language model over transformers, fed with ``inputs_embeds`` so a visual prefix fits in."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vgtrain.errors import TokenizerError
from vgtrain.models.backbones.frozen import FrozenModule
from vgtrain.models.backbones.vision import weights_digest
from vgtrain.models.lora import base_state


class LanguageModel(FrozenModule):
    """Wraps an ``AutoModelForCausalLM`` and its tokenizer.

    ``forward`` returns final hidden states; ``logits`` applies the output head only where asked,
    because with a 50k-token vocabulary the head costs more than the whole tiny adapter and
    most positions (prefix, prompt, padding) carry no loss.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        source: str,
        trainable: bool = False,
    ) -> None:
        super().__init__(trainable=trainable)
        if tokenizer.eos_token_id is None:
            raise TokenizerError(
                f"LLM {name!r}: the tokenizer from {source} has no EOS token and captions need one to stop; "
                "use a tokenizer that defines eos_token (set model.llm.path to a folder whose tokenizer does)"
            )
        if tokenizer.pad_token_id is None:
            # Padding positions are masked out of attention and loss, so EOS is a safe pad.
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.hidden_size: int = int(model.get_input_embeddings().embedding_dim)
        self.vocab_size: int = int(model.get_output_embeddings().weight.shape[0])
        self.freeze_if_needed()

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Any:
        """Runs the decoder stack (without the output head); returns the base model's output
        (with ``output_hidden_states``: also ``hidden_states``, the embeddings then each block's
        output)."""
        extra: dict[str, Any] = {"past_key_values": past_key_values} if past_key_values is not None else {}
        if output_hidden_states:
            extra["output_hidden_states"] = True
        if position_ids is not None:
            extra["position_ids"] = position_ids
        return self.model.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache, **extra
        )

    def causal_mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """A ready ``[1, 1, length, length]`` causal mask for right-padded training sequences
        (transformers uses a 4D mask as given: no mask building, no read of a padding mask back
        to the host), or None where the attention implementation takes no 4D mask."""
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        return self._as_4d_mask(allowed, dtype)

    def segment_mask(self, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The ``[rows, 1, length, length]`` mask of packed rows: causal within each sample
        (``segments``: the sample's place in its row, -1 for padding), nothing across samples."""
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal
        mask = self._as_4d_mask(allowed[:, None], dtype)
        if mask is None:
            raise ValueError(
                f"data.pack_length needs an attention implementation that takes a 4D mask (sdpa or "
                f"eager); this LLM uses {self.model.config._attn_implementation!r}"
            )
        return mask

    def _as_4d_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation == "sdpa":
            return allowed
        if implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return None

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm the decoder applies after its last block (GPT-2 ``ln_f``, Llama ``norm``, OPT
        ``decoder.final_layer_norm``), applied to ``hidden``: a block's output as the head reads it."""
        base = self.model.base_model
        for name in ("ln_f", "norm", "decoder.final_layer_norm"):
            try:
                return base.get_submodule(name)(hidden)
            except AttributeError:
                continue
        raise TypeError(
            f"cannot find the final norm of {type(base).__name__} (ln_f, norm, decoder.final_layer_norm)"
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "model_class": type(self.model).__name__,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            # Of the pretrained weights: LoRA layers (vgtrain.models.lora) are adapter, not backbone.
            "weights_digest": weights_digest(base_state(self.model)),
        }
