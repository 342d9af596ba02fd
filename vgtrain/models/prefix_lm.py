"""The composed model: frozen vision -> mapper -> prefix and/or gated cross-attention memory ->
frozen LLM -> loss on caption tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.backbones.vision import VisionBackbone, VisualFeatures
from vgtrain.models.grounding import grounding_loss
from vgtrain.models.lm_loss import IGNORE_INDEX, caption_loss, caption_positions, sample_mean_weights
from vgtrain.models.mapper import Mapper
from vgtrain.models.xattn import CrossAttentionAdapter

__all__ = [
    "IGNORE_INDEX",
    "PackedRows",
    "PrefixLMOutput",
    "VisualPrefixLM",
    "caption_positions",
    "prompt_token_ids",
]


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, prefix_length: int) -> list[int]:
    """The tokens between the visual prefix and the caption. Without a prefix the sequence
    starts with BOS (EOS where there is none, as GPT-2 does), so even the first caption token is
    predicted from a position that can attend to the image through cross-attention."""
    ids: list[int] = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    if prefix_length == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start, *ids]
    return ids


@dataclass
class PrefixLMOutput:
    loss: torch.Tensor  # mean cross-entropy over caption tokens
    num_tokens: torch.Tensor  # caption tokens that carried loss
    # of those, how many the argmax predicted (teacher forcing); None when not asked for
    num_correct: torch.Tensor | None
    # samples that carried loss, when the loss is a mean over samples (loss_reduction="sample")
    num_samples: torch.Tensor | None = None
    # the grounding loss at the visual positions, when the batch has targets (models/grounding.py)
    grounding_loss: torch.Tensor | None = None


@dataclass
class PackedRows:
    """Several samples per row (``data.pack_length``; built by vgtrain/data/packing.py).

    ``index`` [rows, length]: where each position's input embedding comes from, in the text
    embeddings flattened followed by the samples' prefixes flattened; ``positions``: the position
    within its sample; ``segments``: the sample's place in its row (-1: padding), which the
    block-diagonal causal mask is made of."""

    index: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict) -> PackedRows | None:
        if "pack_index" not in batch:
            return None
        return cls(batch["pack_index"], batch["pack_positions"], batch["pack_segments"])


class VisualPrefixLM(nn.Module):
    """p(y_t | y_<t, I) through two routes, either or both:

    - prefix (ClipCap/LLaVA): the mapper's prefix P is prepended to the embedded prompt and caption;
    - cross-attention (Flamingo): gated blocks in the LLM attend over a visual memory (the patch
      tokens, or a perceiver resampler's latents).

    Sequence layout (the collator builds labels for the same layout):
    ``[P_1..P_K][prompt tokens][caption tokens][EOS][pad...]``; only caption tokens and EOS carry
    loss. Without a prefix, the prompt starts with a BOS token so the first word has a context.
    """

    def __init__(
        self,
        vision: VisionBackbone,
        llm: LanguageModel,
        mapper: Mapper | None,
        xattn: CrossAttentionAdapter | None = None,
        memory: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mapper is None and xattn is None:
            raise ValueError("the model needs a mapper (prefix), cross-attention layers, or both")
        self.vision = vision
        self.llm = llm
        self.mapper = mapper
        self.xattn = xattn
        self.memory = memory  # features -> cross-attention memory; None: the patch tokens as they are
        self.lm_loss = "auto"  # head + cross-entropy implementation (see models/lm_loss.py)
        self.loss_reduction = "token"  # mean over tokens, or over samples (see models/lm_loss.py)
        # The block whose output the grounding loss reads (None: the LLM's output; models/grounding.py)
        self.grounding_layer: int | None = None

    @property
    def prefix_length(self) -> int:
        return self.mapper.prefix_length if self.mapper is not None else 0

    def feature_needs(self) -> set[str]:
        """Which visual features the adapters read: ``"pooled"`` and/or ``"tokens"``."""
        needs = {"tokens"} if self.xattn is not None else set()
        if self.mapper is not None:
            needs.add(getattr(self.mapper, "source", "tokens"))
        return needs

    def visual_memory(self, features: VisualFeatures) -> torch.Tensor:
        return self.memory(features.tokens) if self.memory is not None else features.tokens

    @contextlib.contextmanager
    def visual_context(self, features: VisualFeatures) -> Iterator[None]:
        """Binds the cross-attention memory for every LLM call inside (forward or ``generate``)."""
        if self.xattn is None:
            yield
            return
        with self.xattn.bind(self.visual_memory(features)):
            yield

    def features(
        self, pixel_values: torch.Tensor | None = None, features: VisualFeatures | None = None
    ) -> VisualFeatures:
        """Visual features from images, or the precomputed ones when given."""
        if features is not None:
            return features
        if pixel_values is None:
            raise ValueError("pass pixel_values or precomputed features")
        return self.vision.encode(pixel_values)

    def input_embeddings(
        self,
        features: VisualFeatures,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P; text]``, or with ``image_position`` ([B]: text tokens before the image, as a
        conversation's ``<image>`` places it) ``[text[:pos]; P; text[pos:]]`` per row."""
        text = self.llm.embed(input_ids)
        if self.mapper is None:
            return text, attention_mask
        prefix = self.mapper(features)
        embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        if image_position is None:
            return embeds, mask
        # One gather (the identity where the image comes first; no host read to find out) moves the prefix to each row's place: output position j reads combined
        # position K + j before the image, j - pos inside the prefix, j after it.
        k = prefix.shape[1]
        j = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
        pos = image_position.to(embeds.device).unsqueeze(1)
        index = torch.where(j < pos, j + k, torch.where(j < pos + k, j - pos, j))
        embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        return embeds, mask.gather(1, index)

    def check_packable(self) -> None:
        """Packed rows hold several images' prefixes; cross-attention reads one image per row."""
        if self.mapper is None or self.xattn is not None:
            raise ValueError(
                "data.pack_length packs several images' prefixes into a row; cross-attention reads "
                "one image per row: set data.pack_length=0 with model/xattn"
            )

    def packed_embeddings(
        self, features: VisualFeatures, input_ids: torch.Tensor, packed: PackedRows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed rows' input embeddings (one gather from the text embeddings and the prefixes),
        their block-diagonal causal mask and their per-sample positions."""
        self.check_packable()
        text = self.llm.embed(input_ids)
        prefix = self.mapper(features).to(text.dtype)
        pool = torch.cat([text.flatten(0, 1), prefix.flatten(0, 1)])
        embeds = pool[packed.index]
        mask = self.llm.segment_mask(packed.segments, embeds.dtype)
        return embeds, mask, packed.positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        features: VisualFeatures | None = None,
        image_position: torch.Tensor | None = None,
        loss_index: torch.Tensor | None = None,
        loss_targets: torch.Tensor | None = None,
        with_accuracy: bool = True,
        packed: PackedRows | None = None,
        grounding_targets: torch.Tensor | None = None,
    ) -> PrefixLMOutput:
        """``loss_index``/``loss_targets``: the caption positions as the collator precomputed
        them (:func:`caption_positions`); derived from ``labels`` when absent, which reads the
        labels' values (a host sync on an accelerator). ``packed``: rows holding several samples
        (then ``labels`` is laid out over ``packed.index``'s positions). ``grounding_targets``
        ([batch, prefix, k] token ids, see models/grounding.py): adds the grounding loss."""
        expected = packed.index.shape[1] if packed is not None else self.prefix_length + input_ids.shape[1]
        if labels.shape[1] != expected:
            raise ValueError(
                f"labels cover {labels.shape[1]} positions but prefix + text is {expected}; "
                "the collator's prefix_length must equal the mapper's"
            )
        if loss_index is None or loss_targets is None:
            loss_index, loss_targets = caption_positions(labels)
        features = self.features(pixel_values, features)
        if packed is not None:
            embeds, mask, positions = self.packed_embeddings(features, input_ids, packed)
            context = contextlib.nullcontext()
        else:
            embeds, mask = self.input_embeddings(features, input_ids, attention_mask, image_position)
            # The layout pads on the right, so a causal mask alone keeps every real position from
            # seeing padding; padded positions carry no loss. A ready 4D causal mask spares
            # transformers building one from the padding mask, which reads it back to the host.
            causal = self.llm.causal_mask(embeds.shape[1], embeds.device, embeds.dtype)
            mask, positions = (causal if causal is not None else mask), None
            context = self.visual_context(features)
        layer = self.grounding_layer if grounding_targets is not None else None
        with context:
            output = self.llm(embeds, mask, position_ids=positions, output_hidden_states=layer is not None)
        hidden = output.last_hidden_state
        position_weights, num_samples = None, None
        if self.loss_reduction == "sample":
            samples, capacity = self.loss_samples(loss_index, labels, packed)
            position_weights, num_samples = sample_mean_weights(samples, capacity)
        head = self.llm.model.get_output_embeddings()
        result = caption_loss(
            hidden,
            loss_index,
            loss_targets,
            head.weight,
            getattr(head, "bias", None),
            implementation=self.lm_loss,
            with_accuracy=with_accuracy,
            position_weights=position_weights,
        )
        num_tokens = torch.tensor(loss_index.shape[0], device=hidden.device)  # a known size: no sync
        grounding = None
        if grounding_targets is not None:
            read = hidden if layer is None else self.llm.final_norm(output.hidden_states[layer + 1])
            visual = self.prefix_hidden(read, image_position)
            grounding = grounding_loss(
                visual, grounding_targets.to(hidden.device), head.weight, getattr(head, "bias", None)
            )
        return PrefixLMOutput(result.loss, num_tokens, result.num_correct, num_samples, grounding)

    def check_groundable(self) -> None:
        """Raises ValueError unless prefix position j is the image's visual token j (the grounding
        loss reads the prefix by grid cell)."""
        if self.mapper is None or not self.mapper.per_token:
            raise ValueError(
                "it needs a prefix of one embedding per visual token: model/mapper=projector "
                "(or projector_local), or the transformer mapper with output=inputs"
            )

    def prefix_hidden(self, hidden: torch.Tensor, image_position: torch.Tensor | None) -> torch.Tensor:
        """The LLM's output at the visual prefix's positions, [batch, prefix, d] (padded rows)."""
        k = self.prefix_length
        if image_position is None:
            return hidden[:, :k]
        index = image_position.to(hidden.device).unsqueeze(1) + torch.arange(k, device=hidden.device)
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def loss_samples(
        loss_index: torch.Tensor, labels: torch.Tensor, packed: PackedRows | None
    ) -> tuple[torch.Tensor, int]:
        """Which sample each loss position belongs to, as an id below the returned bound: its row,
        or in packed rows its row and segment (a labelled position's predecessor is in its sample)."""
        rows, length = labels.shape
        row = torch.div(loss_index, length - 1, rounding_mode="floor")
        if packed is None:
            return row, rows
        position = loss_index - row * (length - 1) + 1
        return row * length + packed.segments[row, position], rows * length

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: adapters, and the LLM only when it is trained.

        Tied weights keep every name (GPT-2's ``lm_head.weight`` is ``wte.weight``), so loading
        cannot overwrite a trained tensor with a stale alias.
        """
        return {
            key: value.detach()
            for key, value in self.state_dict(keep_vars=True).items()
            if isinstance(value, nn.Parameter) and value.requires_grad
        }
