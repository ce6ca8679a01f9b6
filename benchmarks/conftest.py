"""Fixtures of the benchmark suite and the summary table printed at the end.

Run with ``python -m pytest benchmarks/ -q`` (the default ``pytest`` run only
collects ``tests/``).  The table is also written to
``benchmarks/.results/results.json`` and ``benchmarks/.results/results.txt``.
"""
import datetime
import json
import os
import platform
from pathlib import Path

import pytest

import _bench
import kvcache
from kvcache._benchkit import CopyLimit, NumpyCache

RESULTS_DIR = Path(__file__).parent / ".results"


@pytest.fixture(scope="session")
def cache():
    """One prefaulted cache of the benchmark shape, shared by every benchmark (1 GiB)."""
    c = kvcache.TieredKVCache(n_layers=_bench.N_LAYERS, n_kv_heads=_bench.N_HEADS,
                              head_dim=_bench.HEAD_DIM, max_seq_len=_bench.MAX_SEQ_LEN,
                              prefault=True)
    yield c
    c.close()


@pytest.fixture
def fresh_cache(cache):
    """The shared cache, empty, with its default thread count and SIMD path restored after."""
    cache.reset()
    cache.threads = _bench.CORES
    kvcache.set_simd_backend("auto")
    yield cache
    cache.reset()
    cache.threads = _bench.CORES
    kvcache.set_simd_backend("auto")


@pytest.fixture(scope="session")
def numpy_cache():
    """The hand-written preallocated numpy cache (1 GiB)."""
    return NumpyCache(_bench.N_LAYERS, _bench.N_HEADS, _bench.HEAD_DIM, _bench.MAX_SEQ_LEN)


@pytest.fixture(scope="session")
def limit_buffer():
    """The copy limit's destination, as large as the cache's arenas (1 GiB)."""
    return CopyLimit(_bench.N_LAYERS, _bench.N_HEADS, _bench.HEAD_DIM, _bench.MAX_SEQ_LEN)


@pytest.fixture(scope="session")
def kv_inputs():
    """Keys and values ``[n_layers, T, H, D]`` for a few T, made once."""
    made = {}

    def get(tokens):
        if tokens not in made:
            made[tokens] = _bench.make_kv(tokens)
        return made[tokens]
    return get


FILE_ORDER = {"test_store.py": 0, "test_get.py": 1, "test_dtypes.py": 2, "test_cold.py": 3,
              "test_transformers.py": 4}


def pytest_collection_modifyitems(config, items):
    """Stores, then reads, then the cold tier, so the summary table reads in the README's order."""
    items.sort(key=lambda item: FILE_ORDER.get(item.path.name, len(FILE_ORDER)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _bench.RESULTS
    if not rows:
        return
    tr = terminalreporter
    lines = _bench.format_table(rows)
    meta = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": _bench.CORES,
        "simd_auto": _auto_backend(),
        "numpy": __import__("numpy").__version__,
        "kvcache": kvcache.__version__,
        "token_bytes": _bench.TOKEN_BYTES,
    }
    tr.write_sep("=", "kvcache benchmarks: project vs baseline (ratio = baseline time / project time)")
    tr.write_line(f"token = {_bench.TOKEN_BYTES // 1024} KiB ({_bench.N_LAYERS} layers x "
                  f"{_bench.N_HEADS} heads x {_bench.HEAD_DIM} x float32 x K+V); "
                  f"{meta['cores']} cores, SIMD auto = {meta['simd_auto']}; medians of interleaved rounds "
                  f"(means where a row says so)")
    for line in lines:
        tr.write_line(line)
    try:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS_DIR / "results.txt").write_text("\n".join(lines) + "\n")
        tr.write_line(f"(written to {os.path.relpath(RESULTS_DIR / 'results.json')})")
    except OSError as exc:  # a read-only checkout must not fail the run
        tr.write_line(f"(could not write {RESULTS_DIR}: {exc})")


def _auto_backend():
    cur = kvcache.simd_backend()
    try:
        return kvcache.set_simd_backend("auto")
    finally:
        kvcache.set_simd_backend(cur)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
