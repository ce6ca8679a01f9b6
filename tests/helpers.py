"""Helpers shared by the test files: import them from here (``from helpers import ...``).

One plain module rather than conftest.py: pytest loads conftest.py as a plugin
and advises against importing it; this module is imported like any other (by
the tests, by isolate.py's fork server, by a subprocess).  conftest.py keeps
the fixtures.
"""
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

import kvcache

SHAPE = dict(n_layers=3, n_kv_heads=2, head_dim=5)

# Hypothesis runs derandomized, without its example database, in CI and when asked.
DETERMINISTIC = any(os.environ.get(v, "") not in ("", "0") for v in ("CI", "KVCACHE_DERANDOMIZE"))

HANG_GUARD = 300  # seconds; run_threads reaches it only if the library deadlocks


def rows(n, layers=None, seed=0, heads=SHAPE["n_kv_heads"], dim=SHAPE["head_dim"]):
    """Random float32 tokens, [n, H, D] (or [layers, n, H, D])."""
    rng = np.random.default_rng(seed)
    shape = (n, heads, dim) if layers is None else (layers, n, heads, dim)
    return rng.standard_normal(shape, dtype=np.float32)


def random_bits(rng, shape):
    """float32 values of random bit patterns (NaNs, infs and subnormals included).
    ``rng``: a numpy Generator, or a seed for a new one."""
    return np.random.default_rng(rng).integers(0, 2**32, shape, dtype=np.uint32).view(np.float32)


def bits(a):
    """The bits of a float32 array, for exact comparison (NaN == NaN bitwise)."""
    return np.ascontiguousarray(a).view(np.uint32)


def tiered(**kw):
    """A tiered cache of SHAPE: 64 positions, 16 of them in RAM, blocks of 4; ``kw`` overrides."""
    args = dict(max_seq_len=64, hot_tokens=16, block_tokens=4, **SHAPE)
    args.update(kw)
    return kvcache.TieredKVCache(**args)


def fill(c, n, seed=0):
    """Store ``n`` random positions in every layer of ``c`` with store_layers: (keys, values)."""
    cfg = c.config
    k = rows(n, layers=cfg.n_layers, seed=seed, heads=cfg.n_kv_heads, dim=cfg.head_dim)
    v = rows(n, layers=cfg.n_layers, seed=seed + 1, heads=cfg.n_kv_heads, dim=cfg.head_dim)
    c.store_layers(k, v)
    return k, v


def contents(c):
    """The bytes of every layer's keys and values: ``contents(c) == before`` is nothing changed."""
    return [(k.tobytes(), v.tobytes()) for k, v in (c.get(l) for l in range(c.config.n_layers))]


def flip_bits(path, offset, mask):
    """Damage a file: XOR the byte at ``offset`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def run_python(*args, ok=True, **kw):
    """``python ARGS`` (``"-c", code, ...``, ``"-m", module, ...`` or a script) in a
    subprocess: its CompletedProcess, output captured as text.  With ``ok`` it must
    exit 0 (its stderr is the failure).  ``kw`` goes to subprocess.run (env, cwd, timeout)."""
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, **kw)
    if ok:
        assert p.returncode == 0, f"exit status {p.returncode}\n{p.stderr}"
    return p


def run_threads(workers, watchers=(), barrier=None):
    """Run ``workers`` and ``watchers`` on their own threads and return the results.

    Watchers are called with an Event that is set once every worker has
    returned (or failed).  The first error is re-raised here (a failing
    worker aborts ``barrier`` first, so the others stop instead of waiting).
    """
    done = threading.Event()
    left = [len(workers)]
    lock = threading.Lock()

    def as_worker(fn):
        def run():
            try:
                return fn()
            except BaseException:
                if barrier is not None:
                    barrier.abort()
                raise
            finally:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return run

    def as_watcher(fn):
        return lambda: fn(done)

    pool = ThreadPoolExecutor(max_workers=len(workers) + len(watchers))
    try:
        futures = [pool.submit(as_worker(fn)) for fn in workers]
        futures += [pool.submit(as_watcher(fn)) for fn in watchers]
        _, pending = wait(futures, timeout=HANG_GUARD)
        assert not pending, "threads still running: deadlock?"
        errors = [f.exception() for f in futures if f.exception() is not None]
        # Report the root cause, not the BrokenBarrierError it caused elsewhere.
        errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
        if errors:
            raise errors[0]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
