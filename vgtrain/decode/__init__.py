"""Decoding with a visual-prefix LM: strategies (greedy, beam, sample on a static KV cache with the
tokens of transformers' ``generate``; MAGIC by hand) and the standalone decoder that loads an export."""

from vgtrain.decode.base import Candidate, DecodeInputs, Decoding, Strategy
from vgtrain.decode.decoder import Result, VisualDecoder
from vgtrain.decode.generate import generate_captions
from vgtrain.decode.strategies import STRATEGIES, get_strategy

__all__ = [
    "STRATEGIES",
    "Candidate",
    "DecodeInputs",
    "Decoding",
    "Result",
    "Strategy",
    "VisualDecoder",
    "generate_captions",
    "get_strategy",
]
