"""Attention shapes of real models, for sweeps (`--preset llama-3-8b,mistral-7b`).

The names are those of `kvkernels memory` (kvkernels.memory.PRESETS), and the same spellings are
accepted (llama3-8b for llama-3-8b, gpt2 for gpt2-small, 30b for opt-30b).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import memory


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


PRESETS = {name: ModelShape(name, hq=p.num_heads, hkv=p.num_kv_heads, head_dim=p.head_dim, layers=p.num_layers)
           for name, p in memory.PRESETS.items()}


def resolve(names: str | None) -> list[ModelShape]:
    """'llama-3-8b,gpt2' -> shapes; raises ValueError naming the unknown preset."""
    if not names:
        return []
    shapes = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        try:
            shapes.append(PRESETS[memory.preset(name).name])
        except ValueError:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return shapes
