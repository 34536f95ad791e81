"""Small models whose attention runs through kvkernels (demo and end-to-end benchmarks)."""

from .gpt import Decoder, DecoderConfig, generate

__all__ = ["Decoder", "DecoderConfig", "generate"]
