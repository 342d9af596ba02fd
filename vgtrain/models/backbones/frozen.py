"""Frozen-by-default wrapper semantics shared by every backbone."""

from __future__ import annotations

from torch import nn


class FrozenModule(nn.Module):
    """A module whose parameters take no gradient and which stays in eval mode.

    Calling ``.train()`` on a parent (Lightning does every epoch) would otherwise switch dropout
    and norm statistics back on inside a backbone that is meant to be a fixed function.
    Subclasses call :meth:`freeze_if_needed` once their submodules exist.
    """

    def __init__(self, trainable: bool = False) -> None:
        super().__init__()
        self.trainable = trainable

    def freeze_if_needed(self) -> None:
        if not self.trainable:
            self.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(mode and self.trainable)
