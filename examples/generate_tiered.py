"""Generate with a tiny random Llama whose KV cache mostly lives on disk.

    pip install torch==2.13.0 && pip install -e ".[transformers]"
    python examples/generate_tiered.py

No download: the model is built from a config with random weights, so the
text is gibberish, but the cache does exactly what it would for a real model.
It prints the tokens, whether DynamicCache gives the same ones, and the
TieredKVCache's stats.
"""
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvcache.integrations.transformers import TieredCache


def main():
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(1))

    # 192 positions a layer in RAM, the rest in 64-position blocks on disk (a
    # private temporary directory), the first 4 positions pinned in RAM.
    cache = TieredCache(config=model.config, max_seq_len=2048, hot_tokens=192, block_tokens=64,
                        sink_tokens=4, eviction_policy="lru", dtype="float16")
    with torch.no_grad():
        out = model.generate(prompt, cache=cache, max_new_tokens=40, do_sample=False)
        ref = model.generate(prompt, cache=DynamicCache(config=model.config), max_new_tokens=40,
                             do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    print("generated:", new)
    print("same tokens as DynamicCache (float32):", new == ref[0, prompt.shape[1]:].tolist())
    print(f"positions: {cache.get_seq_length()}, RAM held by the cache: {cache.kv.nbytes / 1024:.0f} KiB")
    for name, value in cache.kv.stats().items():
        print(f"  {name:20s} {value}")
    cache.close()


if __name__ == "__main__":
    main()
