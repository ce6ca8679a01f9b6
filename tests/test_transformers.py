"""TieredCache in transformers' generate(): the same tokens as DynamicCache, no download."""
import numpy as np
import pytest

from helpers import run_python

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvcache.integrations.transformers import TieredCache  # noqa: E402

PROMPT, NEW = 200, 64


@pytest.fixture(scope="module")
def model():
    # Grouped-query attention: 4 query heads share 2 key/value heads.
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def generate(model, prompt, cache, **kw):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **({"cache": cache} if cache is not None else {}), **kw)
    return out.sequences[0, PROMPT:].tolist(), torch.stack(out.logits)


@pytest.fixture(scope="module")
def reference(model, prompt):
    return generate(model, prompt, DynamicCache(config=model.config))


@pytest.mark.parametrize("options", [
    {},                                                # all in RAM: views of the arenas
    {"hot_tokens": 64, "block_tokens": 16},            # most of the context in the cold tier
    {"hot_tokens": 64, "block_tokens": 16, "eviction_policy": "adaptive", "sink_tokens": 4},
], ids=["in-ram", "tiered", "tiered-adaptive"])
def test_greedy_generate_matches_dynamic_cache(model, prompt, reference, options):
    cache = TieredCache(config=model.config, max_seq_len=512, **options)
    tokens, logits = generate(model, prompt, cache)
    assert tokens == reference[0]
    assert torch.equal(logits, reference[1])  # float32 storage: bit-identical attention inputs
    assert cache.get_seq_length() == PROMPT + NEW - 1 and len(cache) == 3
    if options:
        s = cache.kv.stats()
        assert s["eviction_blocks"] > 0 and s["cold_hits"] > 0  # the cold tier was really read
        assert cache.kv.nbytes == 2 * 3 * 64 * (2 * 16 * 4)  # RAM: 64 positions a layer, of 263
    cache.close()


def test_float16_storage_keeps_logits_close(model, prompt, reference):
    cache = TieredCache(config=model.config, max_seq_len=512, dtype="float16")
    tokens, logits = generate(model, prompt, cache)
    err = (logits - reference[1]).abs().max().item()
    assert err <= 1e-3 * reference[1].abs().max().item()  # stated in the README
    assert tokens == reference[0]


def test_a_decode_step_does_not_copy_the_context(model, prompt):
    cache = TieredCache(config=model.config, max_seq_len=512)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        k1, _ = cache.layers[0].keys, cache.layers[0].values
        model(prompt[:, :1], cache=cache, use_cache=True)
        k2 = cache.layers[0].keys
    # both steps' keys view the same arena: nothing was re-copied
    assert k2.data_ptr() == k1.data_ptr() and k2.shape[2] == PROMPT + 1
    np.testing.assert_array_equal(k2[0, :, :PROMPT].numpy(), k1[0].numpy())


def test_past_key_values_keyword_and_model_forward(model, prompt, reference):
    cache = TieredCache(config=model.config, max_seq_len=512)
    with pytest.warns(Warning, match="past_key_values"), torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == PROMPT
    assert out.logits[0, -1].argmax().item() == reference[0][0]


def test_crop_reset_and_batch_size(model, prompt):
    cache = TieredCache(config=model.config, max_seq_len=512, hot_tokens=64, block_tokens=16)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    cache.crop(-10)
    assert cache.get_seq_length() == PROMPT - 10
    cache.crop(50)
    assert cache.get_seq_length() == 50 and cache.kv.seq_len == 50
    cache.reset()
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad():
        model(prompt.repeat(2, 1), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.reorder_cache(torch.tensor([1, 0]))
    cache.reorder_cache(torch.tensor([0]))


def test_import_kvcache_does_not_import_torch():
    code = "import sys, kvcache; kvcache.TieredKVCache(n_layers=1, n_kv_heads=1, head_dim=4, max_seq_len=4); " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    run_python("-c", code)


def test_the_example_runs():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "generate_tiered.py")
    out = run_python(path).stdout
    assert "same tokens as DynamicCache (float32): True" in out and "eviction_blocks" in out
