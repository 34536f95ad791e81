"""How much memory a KV cache takes, and what fits in a budget.

A decoder layer stores, for every token of every sequence, one key and one value vector per KV
head:

    kv_cache_bytes = 2 (K and V) * num_layers * num_kv_heads * head_dim * seq_len * batch * bytes_per_element

So the cache grows linearly with context and batch, and at long contexts or large batches it
outgrows the weights: OPT-30B (48 layers, 56 heads of 128, no GQA) serving 128 sequences of 1024 tokens
holds 168 GiB of fp16 KV cache, three times its 56 GiB of fp16 weights. Grouped-query attention
(fewer KV heads than query heads) divides the cache by the group size: Llama-2 70B keeps 8 KV heads
for 64 query heads, 1.25 GiB per 4096 tokens instead of 10 GiB.

A paged cache allocates whole pages, so each sequence rounds up to a multiple of the page size;
a contiguous cache reserves max_seq_len per sequence whatever it uses. `paged_kv_cache_bytes`,
`fragmentation` and `contiguous_waste` put numbers on both.

`kvkernels memory` prints the table for the presets below, or for a Hugging Face config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

GiB = 1024 ** 3
MiB = 1024 ** 2

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype or a name ("fp16", "bf16", "fp8" / "fp8_e4m3" / "fp8_e5m2", "fp32")."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(DTYPES))}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name such as 'fp16', got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


def _positive(name, value, allow_zero=False):
    """TypeError for a non-int (bool and float included), ValueError for an int out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be >= {0 if allow_zero else 1}, got {value}")


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
    _budget(budget_bytes)
    return max(0, int(budget_bytes) // page)


def _budget(budget_bytes) -> None:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)):
        raise TypeError(f"budget_bytes must be a number of bytes, got {type(budget_bytes).__name__}")
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")


# ------------------------------------------------------------------------------------- presets

# Weight precisions, in bits per parameter (int4: packed, two per byte; group scales not counted).
WEIGHT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}


def weight_bits(dtype) -> int:
    if isinstance(dtype, str):
        if dtype not in WEIGHT_BITS and dtype not in DTYPES:
            raise ValueError(f"unknown weight dtype {dtype!r}; expected one of {', '.join(WEIGHT_BITS)}")
        return WEIGHT_BITS.get(dtype) or 8 * dtype_bytes(dtype)
    return 8 * dtype_bytes(dtype)


@dataclass(frozen=True)
class ModelPreset:
    """The shapes that size a KV cache, and the parameter count that sizes the weights.

    sliding_window / window_layers: that many of the layers keep only the last sliding_window
    tokens (Mistral-style or interleaved sliding-window attention); the others keep every token.
    """

    name: str
    num_layers: int
    num_heads: int       # query heads
    num_kv_heads: int    # key/value heads (== num_heads without GQA)
    head_dim: int
    num_params: int      # parameters, for the weight memory
    max_context: int     # the model's trained context length
    description: str = ""
    sliding_window: Optional[int] = None
    window_layers: int = 0

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads one GPU holds under tensor parallelism tp: heads are split across GPUs, and
        replicated when there are fewer KV heads than GPUs."""
        _positive("tp", tp)
        if self.num_heads % tp:
            raise ValueError(f"{self.name}: its {self.num_heads} query heads do not split evenly over "
                             f"tensor parallelism {tp}")
        return -(-self.num_kv_heads // tp)

    def kv_bytes_per_token(self, dtype=torch.float16, tp: int = 1) -> int:
        """Bytes one more token adds (all layers, K and V; per GPU under tp) while it is inside every window."""
        return kv_bytes_per_token(self.num_layers, self.kv_heads_per_gpu(tp), self.head_dim, dtype)

    def cached_tokens(self, seq_len: int) -> int:
        """Layer-tokens held for one sequence of seq_len tokens (sum over layers of what each keeps)."""
        _positive("seq_len", seq_len, allow_zero=True)
        windowed = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        return (self.num_layers - self.window_layers) * seq_len + self.window_layers * windowed

    def kv_cache_bytes(self, seq_len: int, batch: int = 1, dtype=torch.float16, tp: int = 1) -> int:
        """Bytes of K and V for `batch` sequences of seq_len tokens (per GPU under tp), windows applied."""
        _positive("batch", batch, allow_zero=True)
        per_layer_token = kv_bytes_per_token(1, self.kv_heads_per_gpu(tp), self.head_dim, dtype)
        return per_layer_token * self.cached_tokens(seq_len) * batch

    def weight_bytes(self, dtype=torch.float16, tp: int = 1) -> int:
        """Bytes of the weights in `dtype` ('fp16', 'bf16', 'fp8', 'int8', 'int4', or a torch dtype),
        split evenly over tp GPUs."""
        _positive("tp", tp)
        return -(-self.num_params * weight_bits(dtype) // (8 * tp))


# Parameter counts are those of the released checkpoints (embeddings included).
PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("gpt2-small", 12, 12, 12, 64, 124_439_808, 1024, "GPT-2 small (124M)"),
    ModelPreset("llama-2-7b", 32, 32, 32, 128, 6_738_415_616, 4096, "Llama 2 7B"),
    ModelPreset("mistral-7b", 32, 32, 8, 128, 7_241_732_096, 32768, "Mistral 7B v0.2/v0.3 (no sliding window)"),
    ModelPreset("llama-3-8b", 32, 32, 8, 128, 8_030_261_248, 8192, "Llama 3 / 3.1 8B"),
    ModelPreset("opt-30b", 48, 56, 56, 128, 29_974_855_680, 2048, "OPT-30B (no GQA)"),
    ModelPreset("llama-2-70b", 80, 64, 8, 128, 68_976_648_192, 4096, "Llama 2 70B"),
    ModelPreset("llama-3-70b", 80, 64, 8, 128, 70_553_706_496, 8192, "Llama 3 70B"),
    ModelPreset("gpt-3-175b", 96, 96, 96, 128, 175_000_000_000, 2048, "GPT-3 175B"),
)}

# Other spellings accepted for a preset (compared without case, '-', '_' or '.').
ALIASES = {"gpt2": "gpt2-small", "30b": "opt-30b", "gpt3": "gpt-3-175b", "llama3-8b": "llama-3-8b"}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP = {**{_squash(n): n for n in PRESETS}, **{_squash(a): n for a, n in ALIASES.items()}}


def preset(name: str) -> ModelPreset:
    """A preset by name; other spellings of the same name are accepted (llama3-8b, llama_3_8b,
    Llama-3-8B), as are the aliases in ALIASES. ValueError naming the presets otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = _LOOKUP.get(_squash(name))
    if key is None:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)} "
                         "(or a path to a Hugging Face config.json)")
    return PRESETS[key]


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def from_hf_config(path) -> ModelPreset:
    """A ModelPreset from a Hugging Face config.json (a file, or a folder holding one).

    Reads num_hidden_layers, num_attention_heads, num_key_value_heads (default: no GQA), head_dim
    (default hidden_size / num_attention_heads), max_position_embeddings and the sliding window:
    `sliding_window` on every layer, on the layers that `layer_types` marks "sliding_attention", or
    (Qwen2) on layers from max_window_layers when use_sliding_window is set. The parameter count comes
    from a model.safetensors.index.json beside it when there is one, else it is estimated from the
    shapes (embeddings, attention, a gated or plain MLP, experts)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object")
    if isinstance(cfg.get("text_config"), dict):  # multimodal: the language model's shapes
        cfg = {**cfg, **cfg["text_config"]}
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise ValueError(f"{file}: no num_hidden_layers / num_attention_heads: not a decoder's config.json?")
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", default=1 if cfg.get("multi_query") else heads)
    head_dim = _first(cfg, "head_dim")
    if head_dim is None:
        if not isinstance(hidden, int):
            raise ValueError(f"{file}: neither head_dim nor hidden_size is given")
        head_dim = hidden // heads
    window, window_layers = cfg.get("sliding_window"), 0
    if isinstance(window, int) and window > 0:
        types = cfg.get("layer_types")
        if isinstance(types, list) and types:
            window_layers = sum(1 for t in types if t == "sliding_attention")
        elif cfg.get("use_sliding_window") is False:
            window_layers = 0
        elif cfg.get("use_sliding_window") and isinstance(cfg.get("max_window_layers"), int):
            window_layers = max(0, layers - cfg["max_window_layers"])
        else:
            window_layers = layers
    if not window_layers:
        window = None
    name = cfg.get("_name_or_path") or (path.name if path.is_dir() else file.parent.name) or file.stem
    return ModelPreset(str(name).rstrip("/").split("/")[-1] or "model", layers, heads, kv_heads, head_dim,
                       _hf_params(cfg, file, layers, heads, kv_heads, head_dim, hidden),
                       int(_first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length",
                                  default=0)), f"from {file}", window, window_layers)


def _hf_params(cfg, file: Path, layers, heads, kv_heads, head_dim, hidden) -> int:
    index = file.parent / "model.safetensors.index.json"
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(cfg.get("torch_dtype") or cfg.get("dtype")))
    try:
        total = json.loads(index.read_text())["metadata"]["total_size"]
        if stored and isinstance(total, int):
            return total // stored
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not isinstance(hidden, int):
        return 0
    vocab = int(cfg.get("vocab_size") or 0)
    inter = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    gated = cfg.get("model_type") not in ("gpt2", "opt", "gpt_neox", "gptj", "falcon", "bloom", "phi")
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    mlp_one = (3 if gated else 2) * hidden * int(_first(cfg, "moe_intermediate_size", default=inter))
    mlp = mlp_one * experts + hidden * experts if experts else (3 if gated else 2) * hidden * inter
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return embed + layers * (attn + mlp + 2 * hidden) + hidden


def max_batch(budget_bytes: int, model: ModelPreset, seq_len: int, *, dtype=torch.float16,
              weight_dtype=torch.float16, include_weights: bool = True, page_size: Optional[int] = None,
              tp: int = 1) -> int:
    """Largest batch of seq_len-token sequences whose cache (+ weights) fits the budget (per GPU
    under tensor parallelism tp). page_size rounds each sequence up to whole pages (a paged cache)."""
    _budget(budget_bytes)
    _positive("seq_len", seq_len)
    free = int(budget_bytes) - (model.weight_bytes(weight_dtype, tp) if include_weights else 0)
    tokens = pages_needed(seq_len, page_size) * page_size if page_size else seq_len
    per_seq = model.kv_cache_bytes(tokens, 1, dtype, tp)
    return max(0, free // per_seq)


def max_context(budget_bytes: int, model: ModelPreset, batch: int = 1, *, dtype=torch.float16,
                weight_dtype=torch.float16, include_weights: bool = True, page_size: Optional[int] = None,
                tp: int = 1) -> Optional[int]:
    """Longest context each of `batch` sequences can hold within the budget (per GPU under tp; whole
    pages when page_size is given). Not capped at the model's trained context. None when every layer
    has a sliding window that fits: the cache then stops growing and any context fits."""
    _budget(budget_bytes)
    _positive("batch", batch)
    free = int(budget_bytes) - (model.weight_bytes(weight_dtype, tp) if include_weights else 0)
    if free <= 0:
        return 0
    per_layer_token = kv_bytes_per_token(1, model.kv_heads_per_gpu(tp), model.head_dim, dtype) * batch
    tokens_all = free // (per_layer_token * model.num_layers)
    w = model.sliding_window
    if w and model.window_layers and tokens_all > w:
        # Past the window the windowed layers stop growing: solve full * t + windowed * w <= free.
        full = model.num_layers - model.window_layers
        rest = free // per_layer_token - model.window_layers * w
        if full == 0:
            return None if rest >= 0 else tokens_all
        tokens_all = max(w, rest // full)
    if page_size:
        tokens_all = tokens_all // page_size * page_size
    return int(tokens_all)


def format_bytes(n: float) -> str:
    """Binary units: 144 MiB, 1.25 GiB, 18 GiB."""
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


_BYTE_UNITS = {"tib": 1024 ** 4, "gib": GiB, "mib": MiB, "kib": 1024, "tb": 10 ** 12, "gb": 10 ** 9,
               "mb": 10 ** 6, "kb": 10 ** 3, "b": 1, "t": 1024 ** 4, "g": GiB, "m": MiB, "k": 1024}


def parse_bytes(text: str, default_unit: str = "B") -> int:
    """'80GiB', '80 GB', '512MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30; G/M/K alone are binary).
    A bare number is in default_unit ('B', or e.g. 'GiB' for a command line). ValueError otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str such as '80GiB', got {type(text).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = (m.group(2) if m else "") or default_unit
    if not m or unit.lower() not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a memory size: expected e.g. 80GiB (2^30 bytes), 80GB (10^9 "
                         "bytes) or 512MiB")
    return int(float(m.group(1)) * _BYTE_UNITS[unit.lower()])


# ------------------------------------------------------------------------------------------ CLI


def _model_arg(text: str) -> ModelPreset:
    if text.endswith(".json") or os.path.sep in text or os.path.exists(text):
        return from_hf_config(text)
    return preset(text)


def table_rows(models: Sequence[ModelPreset], seq_len: int, batch: int, dtype, page_size: int,
               budget: Optional[int], weight_dtype="fp16", tp: int = 1) -> tuple[list[str], list[list[str]]]:
    per_gpu = "/GPU" if tp > 1 else ""
    wname = weight_dtype if isinstance(weight_dtype, str) else str(weight_dtype).replace("torch.", "")
    headers = ["model", "layers", "heads q/kv", "D"] + (["KV heads/GPU"] if tp > 1 else []) + [
        "KV/token" + per_gpu, "KV cache" + per_gpu, f"weights {wname}" + per_gpu, "KV/weights"]
    if budget:
        headers += ["max batch", "max context"]
    rows = []
    for m in models:
        kv = m.kv_cache_bytes(seq_len, batch, dtype, tp)
        w = m.weight_bytes(weight_dtype, tp)
        heads = f"{m.num_heads}/{m.num_kv_heads}"
        row = [m.name, str(m.num_layers), heads, str(m.head_dim)] + ([str(m.kv_heads_per_gpu(tp))] if tp > 1 else [])
        row += [format_bytes(m.kv_bytes_per_token(dtype, tp)), format_bytes(kv), format_bytes(w),
                f"{kv / w:.2f}x" if w else "-"]
        if budget:
            if w >= budget:
                row += ["-", "-"]
            else:
                ctx = max_context(budget, m, batch, dtype=dtype, weight_dtype=weight_dtype, page_size=page_size, tp=tp)
                row += [f"{max_batch(budget, m, seq_len, dtype=dtype, weight_dtype=weight_dtype, page_size=page_size, tp=tp):,}",
                        "any" if ctx is None else f"{ctx:,}"]
        rows.append(row)
    return headers, rows


def _print_table(title: str, headers, rows, notes: Sequence[str], width: int = 100) -> None:
    """Plain text: columns aligned, no trailing spaces, notes wrapped between words."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(title)
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    for note in notes:
        print(textwrap.fill(note, width=width, subsequent_indent="  ", break_long_words=False,
                            break_on_hyphens=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cliargs import size
    names = ", ".join(f"{n} ({p.description})" if n == "opt-30b" else n for n, p in PRESETS.items())
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"presets (default: all): {names}; or a Hugging Face config.json (file or folder)")
    parser.add_argument("--seq-len", type=size(1), default=4096, help="tokens per sequence, e.g. 4096 or 32k (default 4096)")
    parser.add_argument("--batch", type=size(1), default=1, help="sequences (default 1)")
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="cache element type (default fp16; fp8 is fp8_e4m3, vLLM's names; both fp8 formats "
                             "take 1 byte)")
    parser.add_argument("--weight-dtype", default="fp16", choices=list(WEIGHT_BITS),
                        help="weight precision for the weights column and the budget (default fp16)")
    parser.add_argument("--tp", type=size(1), default=1,
                        help="tensor parallelism: GPUs sharing the model; sizes are then per GPU (default 1)")
    parser.add_argument("--page-size", type=size(1), default=16, help="page size for the budget columns (default 16)")
    parser.add_argument("--budget", default=None,
                        help="memory for weights + cache per GPU, e.g. 80GiB, 80GB, or 80 (GiB): adds max batch "
                             "and max context columns")


def run(args) -> int:
    try:
        models = [_model_arg(n) for n in args.models] if args.models else list(PRESETS.values())
        budget = parse_bytes(args.budget, default_unit="GiB") if args.budget else None
        if budget is not None and budget <= 0:
            raise ValueError(f"--budget must be > 0, got {args.budget!r}")
        for m in models:
            m.kv_heads_per_gpu(args.tp)
    except ValueError as e:
        print(f"kvkernels memory: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    headers, rows = table_rows(models, args.seq_len, args.batch, dtype, args.page_size, budget,
                               args.weight_dtype, args.tp)
    from .cliargs import plural
    where = f", tensor parallel {args.tp} (sizes per GPU)" if args.tp > 1 else ""
    title = (f"KV cache of {plural(args.batch, 'sequence')} x {plural(args.seq_len, 'token')}, {args.dtype} "
             f"cache, {args.weight_dtype} weights{where}")
    notes = [f"KV cache = 2 (K, V) x layers x KV heads x D x tokens x {dtype_bytes(dtype)} B"
             + (f"; each GPU holds ceil(KV heads / {args.tp}) KV heads and 1/{args.tp} of the weights" if args.tp > 1 else "")
             + f". KV/weights: the cache over the {args.weight_dtype} weights."]
    if budget:
        notes.append(f"max batch: sequences of {args.seq_len:,} tokens that fit in {format_bytes(budget)}"
                     f"{' per GPU' if args.tp > 1 else ''} beside the weights; max context: tokens per sequence "
                     f"at batch {args.batch}; both in pages of {args.page_size} tokens. '-': the weights alone do "
                     "not fit.")
    for m in models:
        if m.window_layers:
            notes.append(f"{m.name}: {m.window_layers} of {m.num_layers} layers keep only the last "
                         f"{m.sliding_window:,} tokens (sliding window).")
        if m.description.startswith("from "):
            notes.append(f"{m.name}: shapes read {m.description}; weights from "
                         f"{m.num_params / 1e9:.2f}B parameters (from the safetensors index when present, "
                         "else estimated).")
    _print_table(title, headers, rows, notes)
    for m in models:
        if m.max_context and args.seq_len > m.max_context:
            print(f"warning: {args.seq_len:,} tokens exceed {m.name}'s trained context of {m.max_context:,} "
                  "tokens", file=sys.stderr)
    return 0


__all__ = ["kv_cache_bytes", "kv_bytes_per_token", "paged_kv_cache_bytes", "pages_needed", "fragmentation",
           "contiguous_waste", "num_pages_for_budget", "max_batch", "max_context", "ModelPreset", "PRESETS", "preset",
           "from_hf_config", "format_bytes", "parse_bytes", "dtype_bytes", "weight_bits", "ALIASES"]
