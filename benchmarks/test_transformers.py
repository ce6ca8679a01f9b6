"""The cache's cost per decode step inside transformers: TieredCache vs DynamicCache
and StaticCache, each step one ``update`` of every layer, as a model's forward
makes them, at 1k, 8k and 32k positions of context.

Shape: 8 layers x 8 KV heads x 128 (a token = 64 KiB of float32 keys and values)
so that three caches of 32k positions fit in RAM at once.  Each side is filled
to the context (untimed), then every timed step appends one token to every
layer and takes what ``update`` returns (what attention then reads); when a
side has taken MARGIN tokens it is cropped back (untimed).
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, StaticCache  # noqa: E402

from _bench import measure  # noqa: E402
from kvcache._benchkit import Arena, Side  # noqa: E402
from kvcache.integrations.transformers import TieredCache  # noqa: E402

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
