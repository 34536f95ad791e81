"""How much memory a KV cache takes, and what fits in a budget.

A decoder layer stores, for every token of every sequence, one key and one value vector per KV
head:

    kv_cache_bytes = 2 (K and V) * num_layers * num_kv_heads * head_dim * seq_len * batch * bytes_per_element

So the cache grows linearly with context and batch, and at long contexts or large batches it
outgrows the weights: a 30B model (48 layers, 56 heads of 128) serving 128 sequences of 1024 tokens
holds 168 GiB of fp16 KV cache, three times its 56 GiB of fp16 weights. Grouped-query attention
(fewer KV heads than query heads) divides the cache by the group size: Llama-2 70B keeps 8 KV heads
for 64 query heads, 1.25 GiB per 4096 tokens instead of 10 GiB.

A paged cache allocates whole pages, so each sequence rounds up to a multiple of the page size;
a contiguous cache reserves max_seq_len per sequence whatever it uses. `paged_kv_cache_bytes`,
`fragmentation` and `contiguous_waste` put numbers on both.

`kvkernels memory` prints the table for the presets below.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

GiB = 1024 ** 3
MiB = 1024 ** 2

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype or a name ("fp16", "bf16", "fp8", "fp32")."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(DTYPES))}")
        dtype = DTYPES[dtype]
    return torch.empty((), dtype=dtype).element_size()


def _positive(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {value!r}")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float16) -> int:
    """Bytes one token adds to the cache across all layers (K and V)."""
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _positive(name, v)
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes(dtype)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                   dtype=torch.float16) -> int:
    """Bytes of K and V for `batch` sequences of `seq_len` tokens each."""
    _positive("seq_len", seq_len, allow_zero=True)
    _positive("batch", batch, allow_zero=True)
    return kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype) * seq_len * batch


def pages_needed(seq_len: int, page_size: int) -> int:
    """Pages holding one sequence of seq_len tokens (a sequence of 0 tokens holds none)."""
    _positive("seq_len", seq_len, allow_zero=True)
    _positive("page_size", page_size)
    return -(-seq_len // page_size)


def paged_kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_lens: Iterable[int],
                         page_size: int = 16, dtype=torch.float16) -> int:
    """Bytes a paged cache allocates for these sequence lengths (each rounded up to whole pages)."""
    pages = sum(pages_needed(n, page_size) for n in seq_lens)
    return kv_cache_bytes(num_layers, num_kv_heads, head_dim, pages * page_size, 1, dtype)


def fragmentation(seq_lens: Sequence[int], page_size: int) -> float:
    """Fraction of allocated paged slots left empty (internal fragmentation of the last pages)."""
    seq_lens = list(seq_lens)
    slots = sum(pages_needed(n, page_size) for n in seq_lens) * page_size
    return 0.0 if slots == 0 else 1.0 - sum(seq_lens) / slots


def contiguous_waste(seq_lens: Sequence[int], max_seq_len: int) -> float:
    """Fraction of a contiguous [B, max_seq_len] cache left empty by these sequences."""
    seq_lens = list(seq_lens)
    _positive("max_seq_len", max_seq_len)
    if any(n > max_seq_len for n in seq_lens):
        raise ValueError(f"a sequence is longer than max_seq_len={max_seq_len}")
    slots = len(seq_lens) * max_seq_len
    return 0.0 if slots == 0 else 1.0 - sum(seq_lens) / slots


def num_pages_for_budget(budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int = 16,
                         dtype=torch.float16) -> int:
    """How many pages (of all layers, K and V) a memory budget holds."""
    page = kv_cache_bytes(num_layers, num_kv_heads, head_dim, page_size, 1, dtype)
    return max(0, int(budget_bytes) // page)


# ------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class ModelPreset:
    """The shapes that size a KV cache, and the parameter count that sizes the weights."""

    name: str
    num_layers: int
    num_heads: int       # query heads
    num_kv_heads: int    # key/value heads (== num_heads without GQA)
    head_dim: int
    num_params: int      # parameters, for the weight memory
    max_context: int     # the model's trained context length

    def kv_bytes_per_token(self, dtype=torch.float16) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    def kv_cache_bytes(self, seq_len: int, batch: int = 1, dtype=torch.float16) -> int:
        return kv_cache_bytes(self.num_layers, self.num_kv_heads, self.head_dim, seq_len, batch, dtype)

    def weight_bytes(self, dtype=torch.float16) -> int:
        return self.num_params * dtype_bytes(dtype)


# Parameter counts are those of the released checkpoints (embeddings included).
PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("gpt2-small", 12, 12, 12, 64, 124_439_808, 1024),
    ModelPreset("llama-2-7b", 32, 32, 32, 128, 6_738_415_616, 4096),
    ModelPreset("mistral-7b", 32, 32, 8, 128, 7_241_732_096, 32768),
    ModelPreset("llama-3-8b", 32, 32, 8, 128, 8_030_261_248, 8192),
    ModelPreset("30b", 48, 56, 56, 128, 30_000_000_000, 2048),  # OPT-30B shapes
    ModelPreset("llama-2-70b", 80, 64, 8, 128, 68_976_648_192, 4096),
    ModelPreset("llama-3-70b", 80, 64, 8, 128, 70_553_706_496, 8192),
    ModelPreset("gpt-3-175b", 96, 96, 96, 128, 175_000_000_000, 2048),
)}


def preset(name: str) -> ModelPreset:
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise KeyError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def max_batch(budget_bytes: int, model: ModelPreset, seq_len: int, *, dtype=torch.float16,
              weight_dtype=torch.float16, include_weights: bool = True, page_size: Optional[int] = None) -> int:
    """Largest batch of seq_len-token sequences whose cache (+ weights) fits the budget.
    page_size rounds each sequence up to whole pages (a paged cache)."""
    _positive("seq_len", seq_len)
    free = int(budget_bytes) - (model.weight_bytes(weight_dtype) if include_weights else 0)
    tokens = pages_needed(seq_len, page_size) * page_size if page_size else seq_len
    per_seq = model.kv_cache_bytes(tokens, 1, dtype)
    return max(0, free // per_seq)


def max_context(budget_bytes: int, model: ModelPreset, batch: int = 1, *, dtype=torch.float16,
                weight_dtype=torch.float16, include_weights: bool = True, page_size: Optional[int] = None) -> int:
    """Longest context each of `batch` sequences can hold within the budget (whole pages when
    page_size is given). Not capped at the model's trained context."""
    _positive("batch", batch)
    free = int(budget_bytes) - (model.weight_bytes(weight_dtype) if include_weights else 0)
    if free <= 0:
        return 0
    tokens = free // (model.kv_bytes_per_token(dtype) * batch)
    if page_size:
        tokens = tokens // page_size * page_size
    return int(tokens)


def format_bytes(n: float) -> str:
    """Binary units: 144.0 MiB, 1.25 GiB, 18.0 GiB."""
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '512MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    s = text.strip().replace(" ", "")
    units = {"tib": 1024 ** 4, "gib": GiB, "mib": MiB, "kib": 1024, "tb": 10 ** 12, "gb": 10 ** 9, "mb": 10 ** 6,
             "kb": 10 ** 3, "b": 1}
    low = s.lower()
    for u, f in units.items():
        if low.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(float(s))


# ------------------------------------------------------------------------------------------ CLI


def table_rows(models: Sequence[ModelPreset], seq_len: int, batch: int, dtype, page_size: int,
               budget: Optional[int]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "layers", "heads q/kv", "D", "KV/token", "KV cache", "weights fp16", "KV/weights"]
    if budget:
        headers += ["max batch", "max context"]
    rows = []
    for m in models:
        kv = m.kv_cache_bytes(seq_len, batch, dtype)
        w = m.weight_bytes()
        row = [m.name, str(m.num_layers), f"{m.num_heads}/{m.num_kv_heads}", str(m.head_dim),
               format_bytes(m.kv_bytes_per_token(dtype)), format_bytes(kv), format_bytes(w), f"{kv / w:.2f}x"]
        if budget:
            if w >= budget:
                row += ["-", "-"]
            else:
                row += [f"{max_batch(budget, m, seq_len, dtype=dtype, page_size=page_size):,}",
                        f"{max_context(budget, m, batch, dtype=dtype, page_size=page_size):,}"]
        rows.append(row)
    return headers, rows


def _print_table(title: str, headers, rows, note: str) -> None:
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        print(note)
        return
    t = Table(title=title, caption=note, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:  # piped output: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"presets to show (default: all): {', '.join(PRESETS)}")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"],
                        help="cache element type (default fp16)")
    parser.add_argument("--page-size", type=int, default=16, help="page size for the budget columns (default 16)")
    parser.add_argument("--budget", default=None,
                        help="memory budget for weights + cache, e.g. 80GiB: adds max batch / context columns")


def run(args) -> int:
    try:
        models = [preset(n) for n in args.models] if args.models else list(PRESETS.values())
        budget = parse_bytes(args.budget) if args.budget else None
    except (KeyError, ValueError) as e:
        print(f"kvkernels memory: {e}")
        return 2
    dtype = DTYPES[args.dtype]
    headers, rows = table_rows(models, args.seq_len, args.batch, dtype, args.page_size, budget)
    title = f"KV cache of {args.batch} x {args.seq_len} tokens, {args.dtype}"
    note = (f"KV cache = 2 (K, V) * layers * kv_heads * D * tokens * {dtype_bytes(dtype)} B. "
            "KV/weights: cache over fp16 weights.")
    if budget:
        note += (f"\nmax batch: sequences of {args.seq_len} tokens in {format_bytes(budget)} beside fp16 weights; "
                 f"max context: per sequence at batch {args.batch}; pages of {args.page_size} tokens; '-': the "
                 "weights alone do not fit.")
    _print_table(title, headers, rows, note)
    return 0


__all__ = ["kv_cache_bytes", "kv_bytes_per_token", "paged_kv_cache_bytes", "pages_needed", "fragmentation",
           "contiguous_waste", "num_pages_for_budget", "max_batch", "max_context", "ModelPreset", "PRESETS", "preset",
           "format_bytes", "parse_bytes", "dtype_bytes"]
