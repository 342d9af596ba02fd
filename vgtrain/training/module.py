"""LightningModule: the visual-prefix LM, its loss, optimizer and schedule. Checkpoints keep the
trainable tensors only; frozen backbones are rebuilt from their registry entries."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from vgtrain.errors import CheckpointMismatchError
from vgtrain.models import VisualPrefixLM, build_model
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.lm_loss import LOSS_REDUCTIONS
from vgtrain.models.prefix_lm import PackedRows, PrefixLMOutput
from vgtrain.models.xattn import find_decoder_layers
from vgtrain.training.callbacks import samples_in
from vgtrain.training.speed import (
    SpeedSettings,
    apply_at_fit_start,
    apply_to_model,
    attention_context,
    optimizer_options,
    restore_at_fit_end,
)


def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float = 1.0
) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_lr_ratio``. With
    ``decay_fraction`` < 1 the rate holds at its peak and decays over only that last share of the
    steps after warmup (warmup-stable-decay, as MiniCPM trains): skills learnt late, suddenly,
    still get a high rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * (total_steps - warmup_steps)))
    progress = min(1.0, max(0, step - (total_steps - decay_steps)) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def checked_layer(layer: int | None, model: VisualPrefixLM) -> int | None:
    """``model.grounding.layer``: a block index of the LLM, or None (its output)."""
    if layer is None:
        return None
    blocks = len(find_decoder_layers(model.llm.model))
    if not (isinstance(layer, int) and 0 <= layer < blocks):
        raise ValueError(f"layer={layer!r} is not a block of the LLM (0..{blocks - 1}, or null: its output)")
    return layer


class CaptioningModule(L.LightningModule):
    """Trains the adapters (and the LLM when ``llm.trainable``) on caption tokens only."""

    # The total gradient norm of the coming optimizer step, handed over by NonFiniteGuard (which
    # measures it anyway) so that clipping does not read every gradient again; used once.
    measured_gradient_norm: torch.Tensor | float | None = None

    def __init__(
        self,
        vision: dict[str, Any],
        llm: dict[str, Any],
        mapper: dict[str, Any],
        optimizer: partial,
        scheduler: dict[str, Any],
        prompt: str = "",
        xattn: dict[str, Any] | None = None,
        llm_adapter: dict[str, Any] | None = None,
        chat: dict[str, Any] | None = None,  # conversation template (recorded for exports)
        speed: dict[str, Any] | None = None,
        loss_reduction: str = "token",
        grounding: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.model: VisualPrefixLM = build_model(vision, llm, mapper, xattn, llm_adapter)
        self.optimizer_factory = optimizer
        self.scheduler_options = scheduler
        self.prompt = prompt
        self.speed = SpeedSettings.from_options(speed)
        apply_to_model(self.model, self.speed)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"model.loss_reduction={loss_reduction!r}; choose from {', '.join(LOSS_REDUCTIONS)}"
            )
        self.model.loss_reduction = loss_reduction
        # The grounding loss's weight (models/grounding.py); 0: off.
        grounding = dict(grounding or {})
        self.grounding_weight = float(grounding.get("weight", 0.0))
        self.grounding_max_targets = int(grounding.get("max_targets", 4))
        if self.grounding_weight < 0:
            raise ValueError(f"model.grounding.weight must be >= 0, got {self.grounding_weight}")
        if self.grounding_weight:
            try:
                self.model.check_groundable()
                self.model.grounding_layer = checked_layer(grounding.get("layer"), self.model)
            except ValueError as error:
                raise ValueError(f"model.grounding: {error}") from None
        # torch.compile wraps the forward only; kept out of the module tree (no second set of
        # state-dict names for the same parameters).
        self.__dict__["_compiled"] = torch.compile(self.model, dynamic=True) if self.speed.compile else None

    def forward_step(self, *args: Any, **kwargs: Any) -> PrefixLMOutput:
        """The model's forward, compiled when ``trainer.compile`` is on."""
        with attention_context(self.speed, self.device):
            compiled = self.__dict__["_compiled"]  # not `or`: a compiled module has no truth value
            return (compiled if compiled is not None else self.model)(*args, **kwargs)

    def on_fit_start(self) -> None:
        self.backbone_facts()  # weight digests of the backbones as built, before any dtype change
        apply_at_fit_start(self.model, self.speed, self.device, str(self.trainer.precision))

    def on_fit_end(self) -> None:
        restore_at_fit_end(self.model)

    def _step(self, batch: dict[str, Any], stage: str) -> PrefixLMOutput:
        features = None
        if "visual_tokens" in batch:
            features = VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
        # Training metrics are read by the loggers every trainer.log_every_n_steps only; logging
        # them on the other steps would have the progress bar read them (a host sync) every step.
        on_step = stage == "train"
        report = not on_step or self._logs_this_step()
        out = self.forward_step(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            pixel_values=batch.get("pixel_values"),
            features=features,
            image_position=batch.get("image_position"),
            loss_index=batch.get("loss_index"),
            loss_targets=batch.get("loss_targets"),
            with_accuracy=report,
            packed=PackedRows.from_batch(batch),
            grounding_targets=batch.get("grounding_targets") if self.grounding_weight else None,
        )
        if report:
            batch_size = samples_in(batch)
            accuracy = out.num_correct.float() / out.num_tokens.clamp(min=1)
            options = {"batch_size": batch_size, "on_step": on_step, "on_epoch": not on_step}
            self.log(f"{stage}/loss", out.loss, prog_bar=True, **options)
            self.log(f"{stage}/token_accuracy", accuracy, **options)
            if out.grounding_loss is not None:
                self.log(f"{stage}/grounding_loss", out.grounding_loss, **options)
        return out

    def _logs_this_step(self) -> bool:
        """The steps whose metrics the loggers read, and the last one (the run's final figures)."""
        trainer = self._trainer
        if trainer is None or trainer._logger_connector.should_update_logs:
            return True
        return 0 <= trainer.max_steps <= trainer.global_step + 1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._step(batch, "train")
        units = out.num_samples if out.num_samples is not None else out.num_tokens
        loss = out.loss * self._rank_share(units)
        if out.grounding_loss is not None:  # a mean over this rank's grounded cells
            loss = loss + self.grounding_weight * out.grounding_loss
        return loss

    def _rank_share(self, units: torch.Tensor) -> torch.Tensor | float:
        """Under data parallelism each rank's loss is a mean over its own caption tokens (or
        samples, with loss_reduction=sample) and DDP averages the gradients over ranks. Weighting
        by this rank's share of all ranks' units turns that average into the mean over the global
        batch's: the step a single process would take on the whole global batch."""
        world_size = self._trainer.world_size if self._trainer is not None else 1
        if world_size == 1:
            return 1.0
        local = units.detach().float()
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return local * world_size / total.clamp(min=1.0)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        # No weight decay on biases and norm gains (every parameter with fewer than 2 dims).
        decay, no_decay = [], []
        for _, parameter in self.model.trainable_named_parameters():
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        optimizer = self.optimizer_factory(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            **optimizer_options(self.optimizer_factory, self.speed),
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = partial(
            warmup_cosine,
            warmup_steps=int(self.scheduler_options.get("warmup_steps", 0)) or 1,
            total_steps=total,
            min_lr_ratio=float(self.scheduler_options.get("min_lr_ratio", 0.0)),
            decay_fraction=float(self.scheduler_options.get("decay_fraction", 1.0)),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping with the total norm NonFiniteGuard has just measured (``measured_gradient_norm``), as
        ``clip_grad_norm_`` computes it: with a fused optimizer as the optimizer's ``grad_scale``
        (no pass over the gradients, no host sync), else as a multiply only when something is
        clipped. Anything else (no guard, value clipping, sharded gradients) is Lightning's own."""
        norm, self.measured_gradient_norm = self.measured_gradient_norm, None  # once per step
        if norm is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if torch.is_tensor(norm):
            # On the device: the fused optimizer divides the gradients by grad_scale as it reads
            # them (clip_grad_norm_'s coefficient, inverted), so clipping costs no pass and no sync.
            optimizer.grad_scale = ((norm.float() + 1e-6) / float(gradient_clip_val)).clamp(min=1.0)
            return
        coefficient = float(gradient_clip_val) / (norm + 1e-6)
        if coefficient < 1.0:
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            torch._foreach_mul_(grads, coefficient)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.model.trainable_state_dict()
        checkpoint["state_dict"] = {f"model.{name}": tensor for name, tensor in trainable.items()}
        checkpoint["vgtrain"] = self.backbone_facts()

    def backbone_facts(self) -> dict[str, Any]:
        """Names, sizes and weight digests of the backbones, computed once (hashing is not free)."""
        if not hasattr(self, "_backbone_facts"):
            llm = self.model.llm.describe()
            if self.model.llm.trainable:
                llm.pop("weights_digest")  # the trained weights are in the checkpoint itself
            self._backbone_facts = {"vision": self.model.vision.describe(), "llm": llm}
        return self._backbone_facts

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raises :class:`CheckpointMismatchError` (one line, naming the first offending backbone
        fact or tensor) unless ``checkpoint`` was trained with these backbones and adapter shapes."""
        saved = checkpoint.get("vgtrain", {})
        current = self.backbone_facts()
        for part, keys in (
            ("vision", ("name", "token_dim", "embed_dim", "weights_digest")),
            ("llm", ("name", "hidden_size", "vocab_size", "weights_digest")),
        ):
            for key in keys:
                if (
                    key in saved.get(part, {})
                    and key in current[part]
                    and saved[part][key] != current[part][key]
                ):
                    raise CheckpointMismatchError(
                        f"checkpoint was trained with {part} backbone {saved[part].get('name')!r} "
                        f"({key}={saved[part][key]!r}) but the config builds {current[part]['name']!r} "
                        f"({key}={current[part][key]!r}); use the model.{part} config it was trained with"
                    )
        state, expected = checkpoint["state_dict"], self.state_dict()
        trainable = {f"model.{name}" for name in self.model.trainable_state_dict()}
        problems = [
            f"{key} is {list(value.shape)} in the checkpoint but {list(expected[key].shape)} here"
            for key, value in state.items()
            if key in expected and value.shape != expected[key].shape
        ]
        problems += [
            f"{key} is in the checkpoint but not in this model" for key in state if key not in expected
        ]
        problems += [f"{key} is missing from the checkpoint" for key in sorted(trainable - set(state))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointMismatchError(
                f"checkpoint does not fit the adapter this config builds: {problems[0]}{more}; "
                "use the model.mapper/model.xattn settings it was trained with"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint from other backbones or adapter shapes, then supplies the frozen
        tensors it omits so that loading stays strict."""
        self.check_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            state.setdefault(key, value)
