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
def test_demo_command(capsys, cache):
    rc = cli_main(["demo", "--batch", "2", "--prompt-len", "9", "--new-tokens", "6", "--layers", "2",
                   "--cache", cache, "--page-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokens identical: yes (all 2 x 6)" in out
    assert "decode=reference" in out and "prefill=reference" in out      # the one-line backend summary
    assert "CPU reference timings" in out and "not kernel timings" in out
    assert "quadratic" in out and "KV cache:" in out
    # attention work at step t >= 1: with the cache 2 sequences x (9 + t) keys; without, 2 x (9+t)(10+t)/2
    # pairs (the whole sequence again); step 0 reads the prompt either way
    cache_row = next(line for line in out.splitlines() if line.strip().startswith("with cache") and "linear" in line)
    full_row = next(line for line in out.splitlines() if line.strip().startswith("without cache") and "quadratic" in line)
    assert cache_row.split()[2:6] == ["90", "20", "28", f"{90 + sum(2 * (9 + t) for t in range(1, 6))}"]
    assert full_row.split()[2:6] == ["90", "110", "210", f"{sum((9 + t) * (10 + t) for t in range(6))}"]


def test_demo_rejects_bad_sizes(capsys):
    assert cli_main(["demo", "--batch", "0"]) == 2


def test_demo_through_the_triton_kernels(capsys):
    """The same run with the Triton kernels (interpreted on a CPU) behind every op."""
    pytest.importorskip("kvkernels.triton.decode")
    rc = cli_main(["demo", "--backend", "triton", "--dtype", "fp16", "--batch", "2", "--prompt-len", "20",
                   "--new-tokens", "3", "--layers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prefill=triton, append=triton, decode=triton" in out
    assert "tokens identical: yes" in out and "Triton interpreter" in out
