"""The training progress bar: Lightning's own, minus its "Epoch 7/-2" on step-counted runs.

A run counted in steps (``trainer.max_steps``, the usual case on an endless shard stream) has no
last epoch: Lightning sets ``max_epochs=-1`` and its rich bar prints ``Epoch N/-2``. This bar
prints ``Epoch N`` then, and ``Epoch N/M`` only when the run is counted in epochs.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class EpochAwareRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        # As Lightning does: pad to the validation description so the bars do not flicker.
        return f"{description:{len(self.validation_description)}}"


def progress_bar(refresh_rate: int = 1) -> ProgressBar:
    """The rich bar when ``rich`` is installed (what Lightning picks by default), else tqdm's,
    which never printed a last epoch."""
    if _RICH_AVAILABLE:
        return EpochAwareRichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=refresh_rate)
