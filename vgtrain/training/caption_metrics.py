"""Caption metrics during training: at every validation, greedy captions of the first
``num_images`` validation images, scored with BLEU-1..4, ROUGE-L and CIDEr-D (the pure-Python
metrics; METEOR, SPICE and CLIPScore belong to `vgtrain eval`), logged as ``val/bleu_4``,
``val/cider``, ... beside ``val/loss``.

The validation split is read in order, so the images are the same at every validation. The metrics
are logged in ``on_validation_epoch_end``, before ModelCheckpoint decides in ``on_validation_end``,
so ``callbacks.model_checkpoint.monitor=val/cider callbacks.model_checkpoint.mode=max`` keeps the
best checkpoint by CIDEr-D. With a WandbLogger, a table of images, references and predictions is
logged too (``val/captions``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from vgtrain.decode import generate_captions
from vgtrain.metrics import caption_metrics
from vgtrain.models.backbones.vision import VisualFeatures


class CaptionMetrics(L.Callback):
    def __init__(self, num_images: int = 50, max_new_tokens: int = 24, table_rows: int = 16) -> None:
        if num_images < 1:
            raise ValueError(f"callbacks.caption_metrics.num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self.max_new_tokens = max_new_tokens
        self.table_rows = table_rows
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []
        self.references: list[list[str]] = []
        self.pixels: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        need = self.num_images - len(self.references)
        if need <= 0 or trainer.sanity_checking:
            return
        if "visual_tokens" in batch:  # cached features
            features = VisualFeatures(batch["visual_tokens"][:need], batch["visual_pooled"][:need])
        else:
            pixels = batch["pixel_values"][:need]
            features = pl_module.model.features(pixel_values=pixels)
            wants_table = any(isinstance(logger, WandbLogger) for logger in trainer.loggers)
            if wants_table and sum(len(p) for p in self.pixels) < self.table_rows:
                self.pixels.append(pixels[: self.table_rows].cpu())
        self.tokens.append(features.tokens)
        self.pooled.append(features.pooled)
        references = batch.get("references") or [[caption] for caption in batch["captions"]]
        self.references.extend(list(refs) for refs in references[:need])

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.references:
            return
        features = VisualFeatures(torch.cat(self.tokens), torch.cat(self.pooled))
        predictions = generate_captions(
            pl_module.model, features, prompt=pl_module.prompt, max_new_tokens=self.max_new_tokens
        )
        report = caption_metrics(
            {str(i): p for i, p in enumerate(predictions)},
            {str(i): refs for i, refs in enumerate(self.references)},
            metrics=["bleu", "rouge_l", "cider"],
        )
        for name, value in report.values.items():
            # Each rank scores its own images; sync_dist averages them, so every rank has the metric
            # a checkpoint callback may monitor.
            pl_module.log(f"val/{name}", float(value), sync_dist=True, batch_size=len(predictions))
        if trainer.is_global_zero:
            self._log_table(trainer, pl_module, predictions)
        self._reset()

    def _log_table(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list[str]) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or self.table_rows < 1:
            return
        import wandb

        images = _to_images(torch.cat(self.pixels), pl_module.model.vision.transform) if self.pixels else []
        rows = []
        for index in range(min(self.table_rows, len(predictions))):
            image = wandb.Image(images[index]) if index < len(images) else None
            rows.append([trainer.global_step, image, " | ".join(self.references[index]), predictions[index]])
        for logger in loggers:
            logger.log_table("val/captions", columns=["step", "image", "references", "prediction"], data=rows)


def _to_images(pixels: torch.Tensor, transform: Any) -> list[Any]:
    """Normalised pixel tensors back to PIL images, by inverting the transform's Normalize step."""
    from PIL import Image

    mean, std = torch.zeros(3), torch.ones(3)
    for step in getattr(transform, "transforms", []):
        if type(step).__name__ == "Normalize":
            mean, std = torch.tensor(step.mean), torch.tensor(step.std)
    values = (pixels.float() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    arrays = (values.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(array) for array in arrays]
