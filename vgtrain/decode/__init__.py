"""Decoding with a visual-prefix LM (strategies build on transformers' ``generate``)."""

from vgtrain.decode.generate import generate_captions

__all__ = ["generate_captions"]
