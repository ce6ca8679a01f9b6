"""A short demonstration: store throughput beside this machine's copy limit.

Run with ``python -m kvcache``.  Shape: an 8B Llama-class model (32 layers x
8 KV heads x 128 head_dim, float32).  A "token" is one token's keys and
values for every layer (256 KiB at this shape).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import kvcache


def _median_rate(fn, reset, bytes_per_call, rounds):
    """Median seconds per call of fn over `rounds`, calling reset before each."""
    times = []
    for _ in range(rounds):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(layers=32, heads=8, head_dim=128, context=1024, rounds=5):
    rng = np.random.default_rng(0)
    token_bytes = 2 * layers * heads * head_dim * 4
    cache = kvcache.TieredKVCache(n_layers=layers, n_kv_heads=heads, head_dim=head_dim,
                                  max_seq_len=context)
    # The limit: numpy copies of the same bytes into a preallocated arena of the
    # cache's size, a fresh region each step, as the cache writes them.
    arena = np.zeros((2, layers, context, heads, head_dim), np.float32)
    rows = []
    for label, step in (("prefill, 256 tokens/step", 256), ("decode, 1 token/step", 1)):
        step = min(step, context)
        k = rng.standard_normal((layers, step, heads, head_dim), dtype=np.float32)
        v = rng.standard_normal((layers, step, heads, head_dim), dtype=np.float32)
        steps = context // step

        def fill_cache():
            for _ in range(steps):
                cache.store_layers(k, v)

        def fill_numpy():
            for s in range(steps):
                np.copyto(arena[0, :, s * step:(s + 1) * step], k)
                np.copyto(arena[1, :, s * step:(s + 1) * step], v)

        t_lim, t_kvc = [], []
        for _ in range(rounds):  # interleaved: both see the same machine load
            t_lim.append(_median_rate(fill_numpy, lambda: None, 0, 1))
            t_kvc.append(_median_rate(fill_cache, cache.reset, 0, 1))
        n_tokens = steps * step
        lim, kvc = n_tokens / np.median(t_lim), n_tokens / np.median(t_kvc)
        rows.append((label, kvc, kvc * token_bytes / 1e9, lim, lim * token_bytes / 1e9, kvc / lim))
    cache.close()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kvcache", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=1024, help="tokens stored per round")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    print(f"kvcache {kvcache.__version__}: SIMD path {kvcache.simd_backend()} "
          f"(available: {', '.join(kvcache.available_backends())}), "
          f"{kvcache.config.usable_cores()} threads")
    print(f"shape {a.layers} layers x {a.heads} KV heads x {a.head_dim}, float32; "
          f"a token = keys + values of every layer = {2 * a.layers * a.heads * a.head_dim * 4 // 1024} KiB")
    rows = run(a.layers, a.heads, a.head_dim, a.context, a.rounds)
    print(f"{'store_layers':<26}{'kvcache tok/s':>14}{'GB/s':>8}{'copy limit tok/s':>18}{'GB/s':>8}{'ratio':>8}")
    for label, kvc, kvc_gb, lim, lim_gb, ratio in rows:
        print(f"{label:<26}{kvc:>14,.0f}{kvc_gb:>8.1f}{lim:>18,.0f}{lim_gb:>8.1f}{ratio:>7.2f}x")
    print("copy limit: numpy copyto of the same bytes into a preallocated arena, one thread, same run")


if __name__ == "__main__":
    main()
