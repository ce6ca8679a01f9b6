"""The cache's cost per decode step inside transformers: TieredCache vs DynamicCache
and StaticCache, each step one ``update`` of every layer, as a model's forward
makes them, at 1k, 8k and 32k positions of context.

Shape: 8 layers x 8 KV heads x 128 (a token = 64 KiB of float32 keys and values)
so that three caches of 32k positions fit in RAM at once.  Each side is filled
to the context (untimed), then every timed step appends one token to every
layer and takes what ``update`` returns (what attention then reads); when a
side has taken MARGIN tokens it is cropped back (untimed).

Time to first token with prefix reuse (issue #13): a tiny random Llama (fixed
seed, nothing downloaded) answers a prompt whose first SHARED tokens an
earlier request left in a PrefixStore.  The project's step is
``load_prefix`` + ``generate(max_new_tokens=1)`` with a TieredCache (reset
outside the timing); the baselines' steps are the same ``generate`` computing
the whole prompt, with a TieredCache without a store and with a DynamicCache.
Each side's step is a whole prompt (``tokens = PROMPT``), so the ratio is the
ratio of the times to first token.
"""
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import kvcache  # noqa: E402
from _bench import measure  # noqa: E402
from kvcache._benchkit import Arena, Side  # noqa: E402
from kvcache.integrations.transformers import TieredCache, model_shape  # noqa: E402

LAYERS, HEADS, DIM = 8, 8, 128
TOKEN = 2 * LAYERS * HEADS * DIM * 4
MARGIN = 512
CONFIG = LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                     hidden_size=HEADS * DIM, intermediate_size=64, vocab_size=32,
                     max_position_embeddings=64 * 1024)


class Filled(Arena):
    """A transformers Cache holding ``context`` positions plus what the steps added."""

    def __init__(self, cache, context):
        self.cache, self.context, self.capacity = cache, context, MARGIN
        k = torch.randn(1, HEADS, 1024, DIM)
        with torch.no_grad():
            for l in range(LAYERS):
                for start in range(0, context, 1024):
                    n = min(1024, context - start)
                    cache.update(k[:, :, :n], k[:, :, :n], l)

    def used(self):
        return self.cache.get_seq_length() - self.context

    def reset(self):
        self.cache.crop(-self.used())


def _step(cache, k, v):
    def run():
        for l in range(LAYERS):
            cache.update(k, v, l)
    return run


@pytest.mark.parametrize("context", [1024, 8192, 32768], ids=["1k", "8k", "32k"])
def test_decode_step_in_transformers(benchmark, context):
    k, v = torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM)
    total = context + MARGIN
    tiered = TieredCache(config=CONFIG, max_seq_len=total)
    static = StaticCache(config=CONFIG, max_cache_len=total)
    dynamic = DynamicCache(config=CONFIG)
    arenas = [Filled(c, context) for c in (tiered, static, dynamic)]
    try:
        measure(benchmark, name=f"decode step in transformers, {LAYERS} layers, context {context // 1024}k",
                proj=Side("kvcache", _step(tiered, k, v), 1, arenas[0]),
                baselines=[Side("StaticCache", _step(static, k, v), 1, arenas[1]),
                           Side("DynamicCache", _step(dynamic, k, v), 1, arenas[2])],
                targets={"StaticCache": 1.0}, budget_s=3.0, token_bytes=TOKEN)
        n = tiered.get_seq_length()
        keys, _ = tiered.layers[LAYERS - 1].keys, tiered.layers[LAYERS - 1].values
        assert keys.shape == (1, HEADS, n, DIM) and torch.equal(keys[0, :, -1], k[0, :, 0])
    finally:
        tiered.close()


# -- time to first token with and without prefix reuse -------------------------------------

# 4 layers, hidden 256, 4 query heads sharing 2 KV heads of 64: on one idle core a
# 2048-token prefill takes ~0.5 s, the 64 tokens past a reused prefix ~20 ms.
TTFT_CONFIG = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
TTFT_BLOCK = 64
PROMPT = 2048
SHARED = PROMPT - TTFT_BLOCK  # 31 blocks an earlier request's prompt shares; then 64 tokens of this one
TTFT_MODEL = "bench/tiny-random-llama@seed0"
# The model's intra-op threads.  One by default: with two, OpenMP's barriers on a machine
# whose other core is busy make a prefill's time vary several-fold from step to step.
TORCH_THREADS = int(os.environ.get("KVCACHE_BENCH_TORCH_THREADS", "1"))
REUSE, PLAIN, DYNAMIC = "kvcache", "TieredCache, no reuse", "DynamicCache"


@pytest.fixture(scope="module")
def ttft_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(TTFT_CONFIG).eval()


def _ids(seed, n):
    return torch.randint(0, TTFT_CONFIG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def _count_fed(model, fed):
    """Append to ``fed`` the positions each forward of the decoder receives."""
    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        fed.append((args[0] if x is None else x).shape[1])
    return model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_ttft_with_prefix_reuse(benchmark, ttft_model):
    """Time to first token: load_prefix + generate vs generate computing the whole prompt."""
    model, threads = ttft_model, torch.get_num_threads()
    n_layers, n_kv_heads, head_dim = model_shape(TTFT_CONFIG)
    shared = _ids(1, SHARED)
    earlier = torch.cat([shared, _ids(2, PROMPT - SHARED)], 1)
    prompt = torch.cat([shared, _ids(3, PROMPT - SHARED)], 1)  # the same prefix, another question
    store = kvcache.PrefixStore(TTFT_MODEL, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                                block_tokens=TTFT_BLOCK, ram_bytes=1 << 30)
    caches = {REUSE: TieredCache(TTFT_CONFIG, PROMPT + TTFT_BLOCK, block_tokens=TTFT_BLOCK,
                                 prefix_store=store),
              PLAIN: TieredCache(TTFT_CONFIG, PROMPT + TTFT_BLOCK, block_tokens=TTFT_BLOCK)}
    fed = []  # positions each forward of the decoder received during the current step
    runs = {REUSE: [], PLAIN: [], DYNAMIC: []}  # per step: (first token, its logits, fed, loaded)
    handle = _count_fed(model, fed)

    def enter(name):
        """Untimed: an empty cache for the step (TieredCaches reset, a new DynamicCache)."""
        def run():
            fed.clear()
            if name == DYNAMIC:
                caches[DYNAMIC] = DynamicCache(config=TTFT_CONFIG)
            else:
                caches[name].reset()
        return run

    def step(name):
        def run():
            cache = caches[name]
            loaded = cache.load_prefix(prompt) if name == REUSE else 0
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=1, do_sample=False, cache=cache,
                                     return_dict_in_generate=True, output_logits=True)
            runs[name].append((out.sequences[0, -1].item(), out.logits[0][0], tuple(fed), loaded))
        return run

    sides = {name: Side(name, step(name), PROMPT, enter=enter(name)) for name in runs}
    try:
        torch.set_num_threads(TORCH_THREADS)
        with torch.no_grad():  # the earlier request, which leaves its blocks in the store (untimed)
            model.generate(earlier, max_new_tokens=1, do_sample=False, cache=caches[REUSE])
        assert caches[REUSE].save_prefix(earlier) == PROMPT // TTFT_BLOCK
        res = measure(benchmark, name=f"TTFT {PROMPT}-token prompt, {SHARED} reused, tiny Llama 4x256",
                      proj=sides[REUSE], baselines=[sides[PLAIN], sides[DYNAMIC]],
                      token_bytes=2 * n_layers * n_kv_heads * head_dim * 4)
    finally:
        torch.set_num_threads(threads)
        handle.remove()
        caches[REUSE].close()
        caches[PLAIN].close()
        store.close()

    # What was measured is what it says: every reusing step loaded the shared blocks and the
    # model computed only the rest of the prompt; the others computed all of it.
    assert runs[REUSE] and {(f, n) for _, _, f, n in runs[REUSE]} == {((PROMPT - SHARED,), SHARED)}
    for name in (PLAIN, DYNAMIC):
        assert runs[name] and {f for _, _, f, _ in runs[name]} == {(PROMPT,)}
    # Reuse changes nothing the model answers: the first token of a full prefill into a
    # DynamicCache, logits equal up to rounding (the suffix computed in another batch shape).
    ref_token, ref_logits = runs[DYNAMIC][0][:2]
    for name, steps in runs.items():
        for token, logits, _, _ in steps:
            assert token == ref_token, name
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5 * ref_logits.abs().max().item())
    if res:
        ms = res["rows"][0]["proj_median_s"] * 1e3
        info = benchmark.extra_info
        info.update(ttft_ms=ms, prompt_tokens=PROMPT, reused_tokens=SHARED,
                    computed_tokens=PROMPT - SHARED, torch_threads=TORCH_THREADS)
        parts = [f"TTFT with reuse {ms:.1f} ms (model fed {PROMPT - SHARED} tokens)"]
        for row in res["rows"]:
            b_ms = row["baseline_median_s"] * 1e3
            info[f"{row['baseline']}_ttft_ms"] = b_ms
            parts.append(f"{row['baseline']} {b_ms:.1f} ms (fed {PROMPT}): {row['ratio']:.1f}x")
        print("\n" + "; ".join(parts))
