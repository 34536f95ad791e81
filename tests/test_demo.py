"""`kvkernels demo` and the decoder behind it (kvkernels.models.gpt)."""

from __future__ import annotations

import pytest
import torch

from kvkernels.cli import main as cli_main
from kvkernels.models import Decoder, DecoderConfig, generate

TINY = DecoderConfig(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, max_seq_len=256)


@pytest.fixture(scope="module")
def model():
    return Decoder(TINY, seed=0)


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_cached_generation_equals_full_recompute(model, kind):
    prompt = torch.randint(0, TINY.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(3, 11 + 9, kind=kind, page_size=4)
    with_cache = generate(model, prompt, 9, cache=cache)
    without = generate(model, prompt, 9)
    assert torch.equal(with_cache, without)
    # the cache gave every page back, and is reusable
    if kind == "paged":
        assert cache.num_free_pages == cache.num_pages
    assert torch.equal(generate(model, prompt, 9, cache=cache), without)


def test_logits_of_cached_steps_match_full_forward(model):
    prompt = torch.randint(0, TINY.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2, 16, page_size=4)
    ids = cache.batch([cache.allocate(), cache.allocate()])
    seq = prompt
    logits = model.prefill(prompt, cache, ids)
    for _ in range(4):
        torch.testing.assert_close(logits, model.forward_full(seq), atol=1e-4, rtol=1e-4)
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        logits = model.decode(nxt, cache, ids)


def test_tokens_depend_on_the_whole_context(model):
    """What makes the identity check meaningful: change only the first prompt token and the
    continuation changes, so a cache that lost early positions would be caught."""
    prompt = torch.randint(0, TINY.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    other = prompt.clone()
    other[:, 0] = (other[:, 0] + 1) % TINY.vocab_size
    assert not torch.equal(generate(model, prompt, 8), generate(model, other, 8))


def test_chunked_prefill_through_the_cache_matches(model):
    prompt = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(2, 16, page_size=4)
    ids = cache.batch([cache.allocate(), cache.allocate()])
    model.prefill(prompt[:, :5], cache, ids)
    logits = model.prefill(prompt[:, 5:], cache, ids)   # attends through the cache (gather path)
    torch.testing.assert_close(logits, model.forward_full(prompt), atol=1e-4, rtol=1e-4)


def test_weights_are_reproducible():
    a, b = Decoder(TINY, seed=7), Decoder(TINY, seed=7)
    assert torch.equal(a.layers[1].wqkv, b.layers[1].wqkv)
    assert not torch.equal(a.layers[1].wqkv, Decoder(TINY, seed=8).layers[1].wqkv)


@pytest.mark.parametrize("cache", ["paged", "contiguous"])
def test_demo_command(capsys, tmp_path, cache):
    plot = tmp_path / "demo.png"
    rc = cli_main(["demo", "--batch", "2", "--prompt-len", "9", "--new-tokens", "6", "--layers", "2",
                   "--cache", cache, "--page-size", "4", "--repeats", "2", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokens identical with and without the cache: yes (all 2 x 6)" in out
    assert "decode=reference" in out and "prefill=reference" in out      # the one-line backend summary
    assert "ops ran on: PyTorch reference (prefill, append, decode)" in out
    assert "median of 2 runs" in out and "1 CPU thread" in out
    assert "not kernel timings" in out and "KV cache memory" in out
    assert "2 layers" in out and "prompt 9 tokens" in out
    # attention work: step 1 feeds position 9, which sees 10 keys (x 2 sequences); without the cache
    # the whole sequence again, 2 x 10 * 11 / 2 pairs; step 5: 2 x 14 and 2 x 14 * 15 / 2
    rows = {line[:36].strip(): line[36:].split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["attention work, step 1"] == ["20", "110"]
    assert rows["attention work, step 5"][:2] == ["28", "210"]
    assert rows["attention work, all steps"][:2] == [f"{90 + sum(2 * (9 + t) for t in range(1, 6))}",
                                                     f"{sum((9 + t) * (10 + t) for t in range(6)):,}"]
    assert f"plot: {plot}" in out and plot.read_bytes()[:4] == b"\x89PNG"


def test_demo_timing_is_a_median_of_alternating_runs(model):
    from kvkernels.demo import _medians, _timed_runs
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, 5 + 4, page_size=4)
    cached, full, t_cache, t_full = _timed_runs(model, prompt, 4, cache, 3)
    assert torch.equal(cached, full) and torch.equal(cached, generate(model, prompt, 4))
    assert len(t_cache) == len(t_full) == 3 and all(len(r) == 4 for r in t_cache + t_full)
    assert _medians([[1, 9], [3, 2], [2, 4]]) == [2, 4]
    assert cache.num_free_pages == cache.num_pages and cache.live_ids == []


def test_demo_plot_failure_is_reported(capsys, tmp_path):
    rc = cli_main(["demo", "--batch", "1", "--prompt-len", "3", "--new-tokens", "2", "--layers", "1",
                   "--repeats", "1", "--plot", str(tmp_path / "missing" / "demo.png")])
    assert rc == 2 and "plot: cannot write" in capsys.readouterr().err


def test_demo_cuda_backend_on_the_cpu_is_refused(capsys):
    rc = cli_main(["demo", "--device", "cpu", "--backend", "cuda"])
    assert rc == 2 and "--backend cuda needs --device cuda" in capsys.readouterr().err


def test_demo_through_the_triton_kernels(capsys, tmp_path):
    """The same run with the Triton kernels (interpreted on a CPU) behind every op; without --dtype
    it picks fp16, a dtype every Triton kernel takes."""
    pytest.importorskip("kvkernels.triton.decode")
    rc = cli_main(["demo", "--backend", "triton", "--batch", "2", "--prompt-len", "20",
                   "--new-tokens", "3", "--layers", "1", "--repeats", "1", "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prefill=triton, append=triton, decode=triton" in out and "float16" in out
    assert "tokens identical with and without the cache: yes" in out and "Triton interpreter" in out
    if torch.cuda.is_available():
        return
    assert "kvkernels Triton kernels (interpreted on the CPU)" in out
