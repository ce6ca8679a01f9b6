"""The child process of the SIGKILL tests, and the plan it follows.

Run as ``python crash_writer.py DIR SEED DTYPE HOT L H D``: it creates a
persisted cache in DIR and, forever, applies the next step of ``plan(SEED)``
(stores by three different calls, or a truncate), flushes, and prints the
number of steps done.  The test kills it at a random moment and checks that
DIR reopens to exactly the state after one of the flushed steps.
"""
import sys

import numpy as np


def plan(seed):
    """The steps: ("store", n) or ("truncate", length), seeded and endless."""
    rng = np.random.default_rng(seed)
    length = 0
    while True:
        if length > 8 and rng.random() < 0.15:
            length = int(rng.integers(0, length))
            yield "truncate", length
        else:
            n = int(rng.integers(1, 9))
            length += n
            yield "store", n


def written(seed, step, n, shape):
    """The keys step ``step`` stores: [L, n, H, D] (the values are their negation)."""
    return np.random.default_rng([seed, step]).standard_normal((shape[0], n) + shape[1:], np.float32)


def states(seed, n_steps, shape):
    """The float32 keys [L, length, H, D] after each of the first ``n_steps`` steps (and before any)."""
    keys = np.zeros((shape[0], 0) + shape[1:], np.float32)
    out = [keys]
    for step, (kind, arg) in zip(range(n_steps), plan(seed)):
        if kind == "store":
            keys = np.concatenate([keys, written(seed, step, arg, shape)], axis=1)
        else:
            keys = keys[:, :arg]
        out.append(keys)
    return out


def main(d, seed, dtype, hot, L, H, D):
    import kvcache
    shape = (L, H, D)
    c = kvcache.TieredKVCache(n_layers=L, n_kv_heads=H, head_dim=D, max_seq_len=1_000_000,
                              hot_tokens=hot, block_tokens=4, dtype=dtype, cold_dir=d, persist=True)
    for step, (kind, arg) in enumerate(plan(seed)):
        if kind == "truncate":
            c.truncate(arg)
        else:
            k = written(seed, step, arg, shape)
            how = step % 3
            if how == 0:
                c.store_layers(k, -k)
            else:  # layer by layer: a kill can leave the layers at different lengths
                for l in range(L):
                    (c.store if how == 1 else c.store_batch)(l, k[l], -k[l])
        c.flush()
        print(step + 1, flush=True)


if __name__ == "__main__":
    d, seed, dtype, hot, L, H, D = sys.argv[1:]
    main(d, int(seed), dtype, None if hot == "none" else int(hot), int(L), int(H), int(D))
