"""kvkernels.memory: the KV cache calculator, presets, budget helpers and `kvkernels memory`."""

from __future__ import annotations

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


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), ("fp16", 2), ("bf16", 2), ("fp8", 1), ("fp8_e5m2", 1)])
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
    with pytest.raises(ValueError, match="unknown model"):
        preset("llama-9")
    assert preset("Llama_3_8B") is preset("llama3-8b") is memory.PRESETS["llama-3-8b"]


@pytest.mark.parametrize("call", [
    lambda: kv_cache_bytes(32, 8, 128, seq_len=32768.0),
    lambda: kv_cache_bytes(32, 8, 128, 4096, batch=True),
    lambda: memory.pages_needed(10, 16.0),
    lambda: memory.max_batch("80GiB", preset("llama-3-8b"), 4096),
    lambda: memory.dtype_bytes(2),
    lambda: memory.parse_bytes(80),
])
def test_wrong_types_raise_type_error(call):
    with pytest.raises(TypeError):
        call()


@pytest.mark.parametrize("call,match", [
    (lambda: kv_cache_bytes(32, 8, 128, seq_len=-1), "seq_len must be >= 0"),
    (lambda: memory.pages_needed(10, 0), "page_size must be >= 1"),
    (lambda: memory.max_context(0, preset("llama-3-8b")), "budget_bytes must be > 0"),
    (lambda: memory.parse_bytes("lots"), "not a memory size"),
    (lambda: preset("llama-3-8b").kv_heads_per_gpu(3), "do not split evenly"),
])
def test_bad_values_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tensor_parallelism_splits_kv_heads_and_weights():
    m = preset("llama-3-8b")                       # 8 KV heads
    assert [m.kv_heads_per_gpu(tp) for tp in (1, 2, 8, 16, 32)] == [8, 4, 1, 1, 1]   # replicated past 8
    assert m.kv_cache_bytes(4096, tp=2) * 2 == m.kv_cache_bytes(4096)
    assert m.weight_bytes("fp16", tp=4) * 4 == m.weight_bytes("fp16")
    assert m.weight_bytes("int4") * 4 == m.weight_bytes("fp16")
    b1 = memory.max_batch(80 * GiB, m, 4096)
    b2 = memory.max_batch(80 * GiB, m, 4096, tp=2)   # each GPU: half the weights, half the KV heads
    assert b2 == (80 * GiB - m.weight_bytes(tp=2)) // m.kv_cache_bytes(4096, tp=2) > 2 * b1


def test_sliding_window_caps_the_windowed_layers():
    m = memory.ModelPreset("w", 4, 8, 8, 64, 10 ** 6, 1 << 20, sliding_window=100, window_layers=3)
    assert m.cached_tokens(50) == 4 * 50
    assert m.cached_tokens(1000) == 1000 + 3 * 100
    per_layer_token = kv_cache_bytes(1, 8, 64, 1)
    budget = per_layer_token * (5000 + 300) + m.weight_bytes()
    assert memory.max_context(budget, m) == 5000
    every = memory.ModelPreset("all", 4, 8, 8, 64, 10 ** 6, 1 << 20, sliding_window=100, window_layers=4)
    assert memory.max_context(budget, every) is None                 # the cache stops growing: any context


def test_bare_budget_is_gib_on_the_command_line():
    assert memory.parse_bytes("80", default_unit="GiB") == 80 * GiB
    assert memory.parse_bytes("80") == 80
    assert memory.parse_bytes("1.5T") == int(1.5 * 1024 ** 4)


def test_hf_config_shapes(tmp_path):
    import json
    llama = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    m = memory.from_hf_config(tmp_path)
    ref = preset("llama-3-8b")
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.max_context) == (32, 32, 8, 128, 8192)
    assert abs(m.num_params - ref.num_params) / ref.num_params < 0.01     # the estimate: within 1%
    assert m.kv_cache_bytes(4096) == ref.kv_cache_bytes(4096) and m.sliding_window is None
    qwen = dict(llama, model_type="qwen2", sliding_window=4096, use_sliding_window=True, max_window_layers=28)
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert memory.from_hf_config(tmp_path / "config.json").window_layers == 4
    mistral = dict(llama, model_type="mistral", sliding_window=4096)
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    assert memory.from_hf_config(tmp_path).window_layers == 32
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 16_000_000_000}}))
    (tmp_path / "config.json").write_text(json.dumps(dict(llama, torch_dtype="bfloat16")))
    assert memory.from_hf_config(tmp_path).num_params == 8_000_000_000
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        memory.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        memory.from_hf_config(tmp_path)


def test_cli_plain_table(capsys):
    assert cli_main(["memory", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    for m in memory.PRESETS:
        assert m in out
    assert "144 MiB" in out and "1.25 GiB" in out and "18 GiB" in out
    assert "─" not in out  # plain text, no box drawing
    assert all(line == line.rstrip() for line in out.splitlines())


def test_cli_budget_columns_and_30b_ratio(capsys):
    assert cli_main(["memory", "30b", "--batch", "128", "--seq-len", "1024", "--budget", "400GiB"]) == 0
    out = capsys.readouterr().out
    assert "168 GiB" in out and "3.01x" in out and "max batch" in out


def test_cli_unknown_model(capsys):
    assert cli_main(["memory", "llama-9"]) == 2
    assert "unknown model" in capsys.readouterr().err
