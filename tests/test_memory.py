"""kvkernels.memory: the KV cache calculator, presets, budget helpers and `kvkernels memory`."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

from kvkernels import memory
from kvkernels.cache import ContiguousKVCache, PagedKVCache
from kvkernels.cli import main as cli_main
from kvkernels.memory import GiB, MiB, kv_cache_bytes, preset


@pytest.mark.parametrize("name,expected", [
    ("gpt2-small", 144 * MiB),
    ("llama-2-7b", 2 * GiB),
    ("llama-2-70b", 1.25 * GiB),   # 8 KV heads (GQA)
    ("gpt-3-175b", 18 * GiB),
])
def test_known_cache_sizes_at_4096_tokens_fp16(name, expected):
    m = preset(name)
    assert kv_cache_bytes(m.num_layers, m.num_kv_heads, m.head_dim, 4096, batch=1, dtype=torch.float16) == expected
    assert m.kv_cache_bytes(4096) == expected


def test_30b_cache_at_batch_128_is_three_times_its_weights():
    m = preset("30b")
    assert (m.num_layers, m.num_heads, m.head_dim) == (48, 56, 128)
    kv = kv_cache_bytes(48, 56, 128, 1024, batch=128)
    assert kv == 168 * GiB
    assert 2.9 < kv / m.weight_bytes(torch.float16) < 3.1


def test_formula_matches_real_cache_storage():
    for cache, tokens, batch in (
        (ContiguousKVCache(3, 5, 40, 2, 32, dtype=torch.bfloat16), 40, 5),
        (PagedKVCache(3, 7, 16, 2, 32, dtype=torch.float8_e4m3fn), 7 * 16, 1),
    ):
        assert cache.memory_bytes() == kv_cache_bytes(3, 2, 32, tokens, batch, cache.dtype)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), ("fp16", 2), ("bf16", 2), ("fp8", 1)])
def test_bytes_scale_with_dtype(dtype, size):
    assert memory.dtype_bytes(dtype) == size
    assert kv_cache_bytes(2, 4, 64, 10, 3, dtype) == 2 * 2 * 4 * 64 * 10 * 3 * size


def test_paged_rounding_and_fragmentation():
    lens = [1, 16, 17, 0]
    assert [memory.pages_needed(n, 16) for n in lens] == [1, 1, 2, 0]
    per_page = kv_cache_bytes(4, 8, 128, 16)
    assert memory.paged_kv_cache_bytes(4, 8, 128, lens, page_size=16) == 4 * per_page
    assert memory.fragmentation(lens, 16) == pytest.approx(1 - 34 / 64)
    assert memory.fragmentation([32, 48], 16) == 0.0
    assert memory.contiguous_waste([10, 30], 40) == pytest.approx(1 - 40 / 80)
    with pytest.raises(ValueError):
        memory.contiguous_waste([50], 40)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "30b"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_budget_answers_are_tight(name, page_size):
    m = preset(name)
    budget = 80 * GiB
    b = memory.max_batch(budget, m, 4096, page_size=page_size)
    per_seq = m.kv_cache_bytes(4096)
    assert b >= 1
    assert m.weight_bytes() + b * per_seq <= budget < m.weight_bytes() + (b + 1) * per_seq
    ctx = memory.max_context(budget, m, batch=2, page_size=page_size)
    assert m.weight_bytes() + m.kv_cache_bytes(ctx, 2) <= budget
    step = page_size or 1
    assert m.weight_bytes() + m.kv_cache_bytes(ctx + step, 2) > budget
    if page_size:
        assert ctx % page_size == 0


def test_budget_smaller_than_the_weights():
    m = preset("llama-2-70b")
    assert memory.max_batch(80 * GiB, m, 4096) == 0
    assert memory.max_context(80 * GiB, m) == 0
    assert memory.max_batch(80 * GiB, m, 4096, include_weights=False) == 64
    pages = memory.num_pages_for_budget(GiB, m.num_layers, m.num_kv_heads, m.head_dim, page_size=16)
    assert pages == GiB // m.kv_cache_bytes(16)


@pytest.mark.parametrize("text,value", [("80GiB", 80 * GiB), ("512 MiB", 512 * MiB), ("80GB", 80 * 10 ** 9),
                                        ("1e9", 10 ** 9)])
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == value


def test_format_bytes():
    assert memory.format_bytes(144 * MiB) == "144 MiB"
    assert memory.format_bytes(1.25 * GiB) == "1.25 GiB"
    assert memory.format_bytes(18 * GiB) == "18 GiB"


def test_presets_are_consistent():
    for m in memory.PRESETS.values():
        assert m.num_heads % m.num_kv_heads == 0
        assert m.num_params > 0 and m.max_context > 0
    with pytest.raises(KeyError, match="unknown model"):
        preset("llama-9")


@pytest.fixture
def no_rich(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "rich" or name.startswith("rich."):
            raise ImportError("no rich")
        return real_import(name, *args, **kw)

    for mod in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_cli_plain_table(no_rich, capsys):
    assert cli_main(["memory", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    for m in memory.PRESETS:
        assert m in out
    assert "144 MiB" in out and "1.25 GiB" in out and "18 GiB" in out
    assert "─" not in out  # plain text, no box drawing


def test_cli_budget_columns_and_30b_ratio(no_rich, capsys):
    assert cli_main(["memory", "30b", "--batch", "128", "--seq-len", "1024", "--budget", "400GiB"]) == 0
    out = capsys.readouterr().out
    assert "168 GiB" in out and "3.01x" in out and "max batch" in out


def test_cli_rich_table(capsys):
    pytest.importorskip("rich")
    assert cli_main(["memory", "llama-2-7b"]) == 0
    assert "2 GiB" in capsys.readouterr().out


def test_cli_unknown_model(capsys):
    assert cli_main(["memory", "llama-9"]) == 2
    assert "unknown model" in capsys.readouterr().out
