"""kvkernels.integrations.transformers: attn_implementation="kvkernels" and PagedCache.

A tiny randomly initialised Llama (GQA) and Mistral (sliding window) must generate greedily the
same tokens as transformers' eager attention, with the model's own cache, with PagedCache, and for
a left-padded batch; and the kvkernels ops must actually have run.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvkernels.api as api  # noqa: E402
import kvkernels.integrations.transformers as kvk_hf  # noqa: E402


def tiny_llama(**kw):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.1, pad_token_id=0, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_mistral(window):
    config = transformers.MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=window, initializer_range=0.1, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def registered():
    assert kvk_hf.register() == "kvkernels"


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the kvkernels ops the integration runs."""
    calls = {"prefill": 0, "decode": 0, "append": 0}
    for op, name in (("prefill", "prefill_attention"), ("decode", "decode_attention"), ("append", "append_kv")):
        real = getattr(api, name)

        def counted(*a, _real=real, _op=op, **kw):
            calls[_op] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(api, name, counted)
    return calls


def greedy(model, ids, impl, n=12, **kw):
    model.set_attn_implementation(impl)
    mask = kw.pop("attention_mask", torch.ones_like(ids))
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


PROMPT = torch.randint(1, 256, (2, 13), generator=torch.Generator().manual_seed(1))


def test_greedy_matches_eager(op_calls):
    model = tiny_llama()
    ref = greedy(model, PROMPT, "eager")
    out = greedy(model, PROMPT, "kvkernels")
    assert torch.equal(out, ref)
    assert op_calls["prefill"] == 2 and op_calls["decode"] == 2 * 11  # 2 layers: one prompt, 11 decode steps


def test_paged_cache_matches_eager(op_calls):
    model = tiny_llama()
    ref = greedy(model, PROMPT, "eager")
    cache = kvk_hf.PagedCache(model.config, max_batch_size=2, max_cache_len=64, page_size=4)
    out = greedy(model, PROMPT, "kvkernels", past_key_values=cache)
    assert torch.equal(out, ref)
    assert op_calls["append"] == 2 * 12 and op_calls["decode"] == 2 * 11
    pool = cache.pool
    assert cache.get_seq_length() == 13 + 11
    assert sorted(p for i in pool.live_ids for p in pool.pages(i)) == sorted(set(
        p for i in pool.live_ids for p in pool.pages(i)))
    assert len(pool.pages(pool.live_ids[0])) == -(-(13 + 11) // 4)
    cache.reset()
    assert pool.num_free_pages == pool.num_pages


def test_left_padded_batch_matches_eager():
    model = tiny_llama()
    mask = torch.ones_like(PROMPT)
    mask[1, :4] = 0
    ids = PROMPT.masked_fill(mask == 0, 0)
    ref = greedy(model, ids, "eager", attention_mask=mask)
    out = greedy(model, ids, "kvkernels", attention_mask=mask)
    assert torch.equal(out, ref)


def test_paged_cache_refuses_padding():
    model = tiny_llama()
    mask = torch.ones_like(PROMPT)
    mask[1, :4] = 0
    cache = kvk_hf.PagedCache(model.config, max_batch_size=2, max_cache_len=64)
    with pytest.raises(NotImplementedError, match="padded"):
        greedy(model, PROMPT, "kvkernels", attention_mask=mask, past_key_values=cache)


@pytest.mark.parametrize("paged", [False, True], ids=["dynamic-cache", "paged-cache"])
def test_sliding_window_matches_eager(paged):
    model = tiny_mistral(window=6)
    ref = greedy(model, PROMPT, "eager", n=14)
    kw = {}
    if paged:
        kw["past_key_values"] = cache = kvk_hf.PagedCache(model.config, max_batch_size=2, max_cache_len=64, page_size=2)
    out = greedy(model, PROMPT, "kvkernels", n=14, **kw)
    assert torch.equal(out, ref)
    if paged:  # pages behind the window went back to the pool
        pool = cache.pool
        assert all(pool.dropped(i) > 0 for i in pool.live_ids)
        assert all(len(pool.pages(i)) <= 5 for i in pool.live_ids)


def test_unsupported_features_are_named():
    model = tiny_llama()
    model.set_attn_implementation("kvkernels")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(PROMPT, output_attentions=True)


def test_assisted_generation_crops_the_paged_cache_and_matches_eager(monkeypatch):
    # Draft tokens the model rejects are cropped from the pool; verification runs cache_attention.
    calls = {"cache": 0}
    real = api.cache_attention

    def counted(*a, **kw):
        calls["cache"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(api, "cache_attention", counted)
    model = tiny_llama()
    torch.manual_seed(3)
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.1, pad_token_id=0)).eval()
    draft.set_attn_implementation("eager")
    ids = PROMPT[:1]
    ref = greedy(model, ids, "eager", n=20)
    cache = kvk_hf.PagedCache(model.config, max_batch_size=1, max_cache_len=64, page_size=4)
    out = greedy(model, ids, "kvkernels", n=20, assistant_model=draft, **{_cache_kwarg(): cache})
    assert torch.equal(out, ref)
    assert calls["cache"] > 0
    pool = cache.pool
    assert len(pool.pages(pool.live_ids[0])) == -(-cache.get_seq_length() // 4)  # cropped pages went back


def _cache_kwarg() -> str:
    """generate's name for a cache object: `cache` from transformers 5.24, `past_key_values` before."""
    from packaging.version import Version
    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


@pytest.mark.parametrize("kwarg", ["current", "past_key_values"])
def test_paged_cache_through_either_generate_argument(kwarg):
    """The docstring's current API, and the old name where transformers still takes it."""
    import warnings
    model = tiny_llama()
    ref = greedy(model, PROMPT, "eager")
    name = _cache_kwarg() if kwarg == "current" else kwarg
    cache = kvk_hf.PagedCache(model.config, max_batch_size=2, max_cache_len=64, page_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = greedy(model, PROMPT, "kvkernels", **{name: cache})
    assert torch.equal(out, ref)
    if kwarg == "current":
        assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert f"{_cache_kwarg()}=cache" in kvk_hf.__doc__
