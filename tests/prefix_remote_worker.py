"""The two "hosts" of test_prefix_two_hosts.py: processes sharing one Redis.

Each runs in a fresh interpreter with its own RAM tier and its own
``disk_dir``; the only thing they share is the server at ``URL``.  The model
is test_transformers_prefix's tiny random Llama (seed 0, grouped-query
attention, nothing downloaded) and the prompt ``prompt()`` below, so both
build the same weights and ids.

Run as a script (``python prefix_remote_worker.py COMMAND URL DISK_DIR``),
each printing one JSON object on stdout:

- ``save``: prefills the prompt into a TieredCache (one forward), saves its
  prefix to a store with ``remote=URL``; reports the blocks saved, the
  digest of the KV of the stored positions, the store's stats.
- ``load``: computes DynamicCache's greedy tokens of the whole prompt, then
  ``load_prefix`` into its own TieredCache and ``generate``; reports both
  token lists, the positions each forward was fed, the digests of the
  loaded KV and of DynamicCache's, the store's stats.

Both also report ``hash("kvcache prefix")`` (their PYTHONHASHSEED really
differs) and ``kvcache.__file__`` (the kvcache under test).
"""
import hashlib
import json
import sys

import torch
from transformers import DynamicCache

import kvcache
from kvcache.integrations.transformers import TieredCache
from test_transformers_prefix import B, PROMPT, generate, new_store, tiny_llama

STORED = PROMPT // B * B  # the prompt's full blocks: what a load gives
MAX_SEQ = 512


def prompt():
    """The prompt both hosts serve, ``[1, PROMPT]``."""
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(14))


def digest(layers):
    """SHA-256 of ``(keys, values)`` per layer, each ``[n, heads, head_dim]`` float32."""
    h = hashlib.sha256()
    for k, v in layers:
        h.update(k.tobytes())
        h.update(v.tobytes())
    return h.hexdigest()


def tiered_rows(cache, n):
    return [cache.kv.get(layer, 0, n) for layer in range(cache.kv.config.n_layers)]


def dynamic_rows(dyn, n):
    """DynamicCache's ``[1, heads, T, head_dim]`` tensors as the cache's ``[n, heads, head_dim]``."""
    return [(layer.keys[0, :, :n].transpose(0, 1).contiguous().numpy(),
             layer.values[0, :, :n].transpose(0, 1).contiguous().numpy()) for layer in dyn.layers]


def report(**fields):
    print(json.dumps(dict(hash=hash("kvcache prefix"), file=kvcache.__file__, **fields)))


def save(url, disk_dir):
    model, ids = tiny_llama(), prompt()
    with new_store(model, disk_dir=disk_dir, remote=url, remote_errors="raise") as store:
        cache = TieredCache(model.config, MAX_SEQ, block_tokens=B, prefix_store=store)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        assert cache.get_seq_length() == PROMPT
        saved = cache.save_prefix(ids)
        report(saved=saved, kv=digest(tiered_rows(cache, STORED)), stats=store.stats())
        cache.close()


def load(url, disk_dir):
    model, ids = tiny_llama(), prompt()
    dyn = DynamicCache(config=model.config)
    ref, _, ref_fed = generate(model, ids, dyn)
    with new_store(model, disk_dir=disk_dir, remote=url, remote_errors="raise") as store:
        before = store.stats()
        cache = TieredCache(model.config, MAX_SEQ, block_tokens=B, prefix_store=store)
        loaded = cache.load_prefix(ids)
        kv = digest(tiered_rows(cache, loaded))
        seq, _, fed = generate(model, ids, cache)
        report(loaded=loaded, kv=kv, dynamic_kv=digest(dynamic_rows(dyn, STORED)),
               tokens=seq[0].tolist(), reference=ref[0].tolist(), fed=fed, reference_fed=ref_fed,
               before=before, stats=store.stats())
        cache.close()


def main(argv):
    command, url, disk_dir = argv
    if command not in ("save", "load"):
        raise SystemExit(f"unknown command {command!r}: expected save or load")
    (save if command == "save" else load)(url, disk_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
