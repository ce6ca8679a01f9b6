"""The child processes of test_prefix_disk.py, and the KV they store.

The KV of a block is a function of the tokens up to its end (seeded by them),
so any process, given the same prompt, stores the same bytes, and the parent
knows what every record must hold without asking the store.

Run as a script (``python prefix_disk_worker.py COMMAND DIR ...``):

- ``kill-writer DIR SEED``: with umask 0, saves chain after chain
  (``chain([SEED, r], CHAIN_BLOCKS)``, r = 0, 1, ...) until killed; prints
  ``ready`` once its store is open.
- ``save DIR``: with umask 0, saves ``SAVED`` (the chains of ``saved()``).
- ``load DIR``: loads every chain of ``saved()`` byte-exact, prints its stats
  as JSON.

``share_worker`` runs under multiprocessing (spawn): see test_shared_disk_dir.
"""
import json
import os
import sys
import traceback

import numpy as np

import kvcache

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=8, block_tokens=4)
B = SHAPE["block_tokens"]
MODEL = "test/prefix-disk@0"
CHAIN_BLOCKS = 3
# docs/format.md: a 128-byte header and the B token ids padded to 64 bytes, every
# layer's B key and B value rows (float32), a 4-byte CRC32C.
RECORD_BYTES = (-(-(128 + 4 * B) // 64) * 64 + 2 * SHAPE["n_layers"] * B * SHAPE["n_kv_heads"]
                * SHAPE["head_dim"] * 4 + 4)


def chain(seed, n_blocks):
    """A prompt of ``n_blocks`` full blocks of token ids (ints in [0, 2**32))."""
    return [int(t) for t in np.random.default_rng(seed).integers(0, 2**32, n_blocks * B)]


def kv(tokens):
    """The keys and values [L, n, H, D] (float32) of the full blocks of ``tokens``."""
    L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
    ks, vs = [], []
    for i in range(len(tokens) // B):
        rng = np.random.default_rng(tokens[:(i + 1) * B])  # the whole prefix seeds the block
        ks.append(rng.standard_normal((L, B, H, D), np.float32))
        vs.append(rng.standard_normal((L, B, H, D), np.float32))
    empty = np.zeros((L, 0, H, D), np.float32)
    return (np.concatenate(ks, axis=1) if ks else empty,
            np.concatenate(vs, axis=1) if vs else empty)


def store(d, **kw):
    """A store on ``d`` with the RAM tier off (every hit comes from the files)."""
    kw.setdefault("ram_bytes", 0)
    return kvcache.PrefixStore(MODEL, dtype="float32", disk_dir=d, **SHAPE, **kw)


def new_cache(n):
    return kvcache.TieredKVCache(max_seq_len=n + B, hot_tokens=None, dtype="float32", **SHAPE)


def save(st, tokens):
    c = new_cache(len(tokens))
    try:
        k, v = kv(tokens)
        c.store_layers(k, v)
        return st.save(c, tokens)
    finally:
        c.close()


def load_exact(st, tokens):
    """Load ``tokens`` (and one more, so that every block may come) into a new
    cache; assert it holds exactly the KV of the positions loaded; return them."""
    c = new_cache(len(tokens))
    try:
        p = st.load(c, list(tokens) + [7])
        assert p % B == 0 and 0 <= p <= len(tokens), p
        k, v = kv(tokens)
        for layer in range(SHAPE["n_layers"]):
            gk, gv = c.get(layer)
            assert gk.tobytes() == k[layer, :p].tobytes(), f"wrong keys, layer {layer}, {p} positions"
            assert gv.tobytes() == v[layer, :p].tobytes(), f"wrong values, layer {layer}, {p} positions"
        return p
    finally:
        c.close()


def key_names(tokens):
    """The record file names of the blocks of ``tokens``, in chain order."""
    return [k.hex() + ".kvp" for k in
            kvcache.prefix_hashes(tokens, model=MODEL, dtype="float32", **SHAPE)]


def saved():
    """The chains of ``save`` / ``load``: two share their first block."""
    first = chain(900, 1)
    return [chain(901, CHAIN_BLOCKS), first + chain(902, 2), first + chain(903, 1),
            chain(904, 1)]


# -- the processes sharing one directory (test_shared_disk_dir) ------------------------
def shared_prompts():
    """Chains every worker saves: all begin with the same block."""
    system = chain(1000, 1)
    return [system + chain([1001, j], 2) for j in range(6)]


def own_prompts(w):
    """Chains only worker ``w`` saves (the others load them)."""
    return [chain([2000 + w, j], 3) for j in range(4)]


def turns():
    """The chains of the deterministic turns: P, Q, R of 5 blocks, S of 3."""
    return {name: chain([3000, n], n_blocks)
            for n, (name, n_blocks) in enumerate((("P", 5), ("Q", 5), ("R", 5), ("S", 3)))}


def share_worker(w, n_workers, small_dir, big_dir, small_budget, big_budget, barrier, out):
    """One of the workers: see test_shared_disk_dir for the phases."""
    try:
        barrier.wait(60)  # every worker opens the new directories at once
        small, big = store(small_dir, disk_bytes=small_budget), store(big_dir, disk_bytes=big_budget)
        everyone = shared_prompts() + [t for u in range(n_workers) for t in own_prompts(u)]
        rng = np.random.default_rng(w)
        ops = [("save", t) for t in shared_prompts() + own_prompts(w)]
        ops += [("load", everyone[i]) for i in rng.integers(0, len(everyone), 20)]
        ops = [ops[i] for i in rng.permutation(len(ops))]
        barrier.wait(60)
        loads = {"small": 0, "big": 0}
        for kind, tokens in ops:  # phase 2: at random, all at once
            for name, st in (("small", small), ("big", big)):
                if kind == "save":
                    save(st, tokens)
                else:
                    loads[name] += load_exact(st, tokens)
        barrier.wait(60)
        for tokens in everyone:  # phase 3: nothing saved was lost
            p = load_exact(big, tokens)
            assert p == len(tokens), f"worker {w}: {p} of {len(tokens)} positions of a saved chain"
        barrier.wait(60)
        t = turns()  # phase 4: one at a time, the parent looking between turns
        for who, kind, name in ((0, "save", "P"), (1, "save", "Q"), (2, "load", "P"),
                                (0, "save", "R"), (1, "save", "S")):
            if w == who % n_workers:
                if kind == "save":
                    assert save(small, t[name]) == len(t[name]) // B
                else:
                    assert load_exact(small, t[name]) == len(t[name])
            barrier.wait(60)  # this turn is done
            barrier.wait(60)  # the parent has looked at the directory
        out.put(("ok", w, small.stats(), big.stats(), loads))
    except BaseException:
        barrier.abort()
        out.put(("error", w, traceback.format_exc()))


# -- the script ---------------------------------------------------------------------------
def main(argv):
    command, d = argv[0], argv[1]
    if command == "kill-writer":
        os.umask(0)
        seed = int(argv[2])
        st = store(d)
        print("ready", flush=True)
        r = 0
        while True:
            save(st, chain([seed, r], CHAIN_BLOCKS))
            r += 1
    elif command == "save":
        os.umask(0)
        st = store(d)
        print(json.dumps([save(st, t) for t in saved()]))
    elif command == "load":
        st = store(d)
        got = [load_exact(st, t) for t in saved()]
        print(json.dumps({"positions": got, "stats": st.stats()}))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
