"""Attention shapes of real models, for sweeps (`--preset llama3-8b,mistral-7b`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hq: int        # query heads
    hkv: int       # key/value heads (GQA groups)
    head_dim: int
    layers: int

    @property
    def heads(self) -> str:
        return f"{self.hq}/{self.hkv}"


PRESETS = {
    "llama3-8b": ModelShape("llama3-8b", hq=32, hkv=8, head_dim=128, layers=32),
    "llama3-70b": ModelShape("llama3-70b", hq=64, hkv=8, head_dim=128, layers=80),
    "mistral-7b": ModelShape("mistral-7b", hq=32, hkv=8, head_dim=128, layers=32),
    "gpt2": ModelShape("gpt2", hq=12, hkv=12, head_dim=64, layers=12),
}


def resolve(names: str | None) -> list[ModelShape]:
    """'llama3-8b,gpt2' -> shapes; raises ValueError naming the unknown preset."""
    if not names:
        return []
    shapes = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        shapes.append(PRESETS[name])
    return shapes
