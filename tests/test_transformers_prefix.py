"""Prefix reuse through TieredCache in generate(): the same tokens as without reuse,
and the model fed only the prompt tokens that were not loaded.  No download."""
import json
import os

import numpy as np
import pytest

from helpers import run_python

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvcache  # noqa: E402
from kvcache.integrations.transformers import TieredCache, model_shape  # noqa: E402

# Grouped-query attention: 4 query heads share 2 key/value heads (head_dim 16).
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
MODEL = "test/tiny-random-llama@seed0"
B, PROMPT, NEW = 16, 200, 32
STORED = PROMPT // B * B  # 192: the prompt's full blocks
TIERED = dict(hot_tokens=32, block_tokens=B, dtype="float16")  # 32 of ~231 positions in RAM
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def new_store(model, dtype="float32", **kw):
    n_layers, n_kv_heads, head_dim = model_shape(model.config)
    return kvcache.PrefixStore(MODEL, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                               block_tokens=B, dtype=dtype, **kw)


def fed_lengths(model):
    """A list that collects the positions each forward of the decoder receives, and the hook's handle."""
    fed = []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        fed.append((args[0] if x is None else x).shape[1])

    return fed, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def generate(model, ids, cache):
    """(sequence [1, T + NEW], stacked logits, positions fed to each forward) of greedy decoding."""
    fed, handle = fed_lengths(model)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, cache=cache)
    finally:
        handle.remove()
    return out.sequences, torch.stack(out.logits), fed


def assert_logits_close(logits, reference):
    # the rest of the prompt is computed in another batch shape than in one prefill: ulps may differ
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


@pytest.fixture(scope="module")
def reference(model, prompt):
    """DynamicCache without reuse: the sequence, the logits and the cache (its KV of the prompt)."""
    dyn = DynamicCache(config=model.config)
    seq, logits, _ = generate(model, prompt, dyn)
    return seq, logits, dyn


def test_reuse_gives_dynamic_cache_tokens_and_computes_only_the_rest(model, prompt, reference):
    ref_seq, ref_logits, dyn = reference
    with new_store(model) as store:
        first = TieredCache(model.config, 512, block_tokens=B, prefix_store=store)
        assert first.load_prefix(prompt) == 0  # nothing stored yet
        seq, _, fed = generate(model, prompt, first)
        assert torch.equal(seq, ref_seq) and fed[0] == PROMPT
        assert first.save_prefix(seq) == (PROMPT + NEW - 1) // B  # what the cache holds: not the last token

        second = TieredCache(model.config, 512, block_tokens=B, prefix_store=store)
        assert second.load_prefix(prompt) == STORED and second.get_seq_length() == STORED
        for layer in range(3):  # the loaded rows are the prefill's, bit for bit
            k, v = second.kv.get(layer, 0, STORED)
            np.testing.assert_array_equal(k, dyn.layers[layer].keys[0, :, :STORED].transpose(0, 1).numpy())
            np.testing.assert_array_equal(v, dyn.layers[layer].values[0, :, :STORED].transpose(0, 1).numpy())
        seq2, logits2, fed2 = generate(model, prompt, second)
        assert fed2[0] == PROMPT - STORED  # the model saw only the 8 tokens not loaded...
        assert sum(fed2) == PROMPT - STORED + NEW - 1  # ...then one per new token
        assert torch.equal(seq2, ref_seq)
        assert_logits_close(logits2, ref_logits)
        assert second.save_prefix(seq2) == 0  # the same output: every block is already stored

        # a used cache, reset, loads again (its layers already initialized)
        first.reset()
        assert first.load_prefix(prompt) == STORED
        seq3, _, fed3 = generate(model, prompt, first)
        assert torch.equal(seq3, ref_seq) and fed3[0] == PROMPT - STORED
        s = store.stats()
        assert s["hit_tokens_ram"] == 2 * STORED and s["lookups"] == 3 and s["integrity_failures"] == 0
        first.close()
        second.close()


def test_tiered_float16_cache_with_reuse_matches_the_same_cache_without(model, prompt, reference):
    # Sound reference for float16 storage: the same TieredCache config without reuse (attention
    # then reads the same float16-rounded context); DynamicCache's float32 logits differ slightly.
    base = TieredCache(model.config, 512, **TIERED)
    base_seq, base_logits, _ = generate(model, prompt, base)
    assert torch.equal(base_seq, reference[0])
    with new_store(model, dtype="float16") as store:
        first = TieredCache(model.config, 512, prefix_store=store, **TIERED)
        seq, logits, _ = generate(model, prompt, first)
        assert torch.equal(seq, base_seq) and torch.equal(logits, base_logits)  # no reuse: the same run
        assert first.save_prefix(seq) == (PROMPT + NEW - 1) // B
        assert first.kv.stats()["eviction_blocks"] > 0  # saved mostly from the cold tier

        second = TieredCache(model.config, 512, prefix_store=store, **TIERED)
        assert second.load_prefix(prompt) == STORED
        assert second.kv.stats()["eviction_blocks"] > 0  # the loaded prefix went on to the cold tier
        for layer in range(3):  # what the first cache had stored, byte for byte
            for got, want in zip(second.kv.get(layer, 0, STORED), first.kv.get(layer, 0, STORED)):
                np.testing.assert_array_equal(got, want)
        seq2, logits2, fed2 = generate(model, prompt, second)
        assert fed2[0] == PROMPT - STORED and sum(fed2) == PROMPT - STORED + NEW - 1
        assert torch.equal(seq2, base_seq)
        assert_logits_close(logits2, base_logits)
        assert second.kv.stats()["cold_hits"] > 0  # attention read the loaded prefix from the cold tier
        for c in (base, first, second):
            c.close()


def test_a_second_interpreter_reuses_the_disk_dir(model, prompt, reference, tmp_path):
    disk = tmp_path / "prefix"
    with new_store(model, disk_dir=disk, ram_bytes=0) as store:
        cache = TieredCache(model.config, 512, block_tokens=B, prefix_store=store)
        seq, _, _ = generate(model, prompt, cache)
        assert cache.save_prefix(seq) == (PROMPT + NEW - 1) // B
        cache.close()
    child = f"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import kvcache
from kvcache.integrations.transformers import TieredCache
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**{CONFIG!r})).eval()
prompt = torch.tensor([json.loads(sys.argv[1])])
store = kvcache.PrefixStore({MODEL!r}, n_layers=3, n_kv_heads=2, head_dim=16, block_tokens={B},
                            disk_dir={str(disk)!r})
cache = TieredCache(model.config, 512, block_tokens={B}, prefix_store=store)
fed = []
model.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
loaded = cache.load_prefix(prompt)
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens={NEW}, do_sample=False, cache=cache)
print(json.dumps(dict(hash=hash("kvcache prefix"), file=kvcache.__file__, loaded=loaded, fed=fed,
                      tokens=out[0].tolist(), stats=store.stats())))
"""
    seed = os.environ.get("PYTHONHASHSEED", "")
    env = dict(os.environ, PYTHONHASHSEED=str(int(seed) + 1) if seed.isdigit() else "1")
    out = json.loads(run_python("-c", child, json.dumps(prompt[0].tolist()), env=env, cwd=ROOT,
                                timeout=300).stdout)
    assert out["hash"] != hash("kvcache prefix")  # really another hash seed
    assert out["file"].startswith(ROOT)  # the kvcache under test
    assert out["loaded"] == STORED and out["stats"]["hit_tokens_disk"] == STORED
    assert out["fed"][0] == PROMPT - STORED
    assert out["tokens"] == reference[0][0].tolist()


@pytest.fixture
def stored(model, prompt):
    """A store holding the blocks of the prompt and its greedy continuation."""
    with new_store(model) as store:
        cache = TieredCache(model.config, 512, block_tokens=B, prefix_store=store)
        seq, _, _ = generate(model, prompt, cache)
        cache.save_prefix(seq)
        cache.close()
        yield store


@pytest.mark.parametrize("length, loaded", [
    (10, 0),               # shorter than a block: nothing to load
    (STORED, STORED - 1),  # every block stored: all but the last token, which the model computes
    (PROMPT, STORED),
], ids=["shorter-than-a-block", "fully-stored", "partial-last-block"])
def test_prompt_lengths(model, prompt, stored, length, loaded):
    ids = prompt[:, :length]
    ref_seq, ref_logits, _ = generate(model, ids, DynamicCache(config=model.config))
    cache = TieredCache(model.config, 512, block_tokens=B, prefix_store=stored)
    assert cache.load_prefix(ids) == loaded
    seq, logits, fed = generate(model, ids, cache)
    assert fed[0] == length - loaded
    assert torch.equal(seq, ref_seq)
    assert_logits_close(logits, ref_logits)
    cache.close()


@pytest.mark.parametrize("field, value", [
    ("n_layers", 2), ("n_kv_heads", 4), ("head_dim", 8), ("block_tokens", 32), ("dtype", "float16"),
])
def test_a_store_of_another_shape_is_refused_naming_the_field(model, field, value):
    shape = dict(zip(("n_layers", "n_kv_heads", "head_dim"), model_shape(model.config)),
                 block_tokens=B, dtype="float32")
    shape[field] = value
    with kvcache.PrefixStore(MODEL, **shape) as store:
        with pytest.raises(ValueError, match=f"prefix_store does not fit.*{field}="):
            TieredCache(model.config, 512, block_tokens=B, prefix_store=store)


def test_bad_use_is_refused_and_changes_nothing(model, prompt, stored):
    with pytest.raises(TypeError, match="prefix_store expected a kvcache.PrefixStore"):
        TieredCache(model.config, 512, block_tokens=B, prefix_store="store")
    plain = TieredCache(model.config, 512, block_tokens=B)
    for call in (plain.load_prefix, plain.save_prefix):
        with pytest.raises(RuntimeError, match="no prefix store"):
            call(prompt)
    plain.close()

    cache = TieredCache(model.config, 512, block_tokens=B, prefix_store=stored)
    before = stored.stats()
    for batch in (prompt.repeat(2, 1), prompt.repeat(2, 1).numpy(), [prompt[0].tolist()] * 2):
        with pytest.raises(ValueError, match="batch size 1"):
            cache.load_prefix(batch)
        with pytest.raises(ValueError, match="batch size 1"):
            cache.save_prefix(batch)
    with pytest.raises(TypeError, match="token ids"):
        cache.load_prefix(prompt.float())
    assert cache.get_seq_length() == 0 and stored.stats() == before

    assert cache.load_prefix(prompt[0].tolist()) == STORED  # a list of ints does too
    with pytest.raises(ValueError, match="expected an empty cache"):
        cache.load_prefix(prompt)
    assert cache.get_seq_length() == STORED
    cache.close()
