"""The SIMD copy paths against the scalar oracle, and forcing a path."""
import os
import subprocess
import sys

import numpy as np
import pytest

import kvcache
from kvcache import _simd


@pytest.fixture
def restore_backend():
    before = kvcache.simd_backend()
    yield
    kvcache.set_simd_backend(before)


def test_backend_in_use_is_available():
    assert kvcache.simd_backend() in kvcache.available_backends()
    assert "scalar" in kvcache.available_backends()
    if os.environ.get("KVCACHE_SIMD") not in (None, "", "auto"):
        assert kvcache.simd_backend() == os.environ["KVCACHE_SIMD"]


def test_x86_has_its_baseline():
    import platform
    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in kvcache.available_backends()
    if platform.machine() in ("aarch64", "arm64"):
        assert "neon" in kvcache.available_backends()


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_each_path_matches_scalar(backend, streaming):
    # The full grid (0..4099 floats x every misalignment) runs in tests/c;
    # this checks the same functions as the extension module links them.
    rng = np.random.default_rng(1)
    src_buf = rng.integers(0, 2**32, 1300, dtype=np.uint32).view(np.float32)  # NaN payloads too
    # streaming stores start at KVC_NT_MIN_BYTES (2048 bytes = 512 floats)
    for n in list(range(0, 70)) + [127, 128, 129, 255, 256, 257, 511, 512, 513, 600, 1023, 1250]:
        for so in range(0, 16, 3):
            for do in range(0, 16, 5):
                want = np.full(n + 40, 7, np.float32)
                got = want.copy()
                src = src_buf[so:so + n]
                _simd.copy_with("scalar", want[do:do + n], src)
                _simd.copy_with(backend, got[do:do + n], src, streaming)
                assert want.view(np.uint32).tobytes() == got.view(np.uint32).tobytes()
                assert want[do:do + n].view(np.uint32).tobytes() == src.view(np.uint32).tobytes()


def test_unknown_and_unavailable_backends_raise(restore_backend):
    with pytest.raises(ValueError, match="unknown SIMD backend 'mmx'"):
        kvcache.set_simd_backend("mmx")
    missing = [b for b in _simd.BACKENDS if b not in kvcache.available_backends()]
    for b in missing:
        with pytest.raises(ValueError, match="not available"):
            kvcache.set_simd_backend(b)


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_forced_path_stores_exactly(backend, restore_backend):
    assert kvcache.set_simd_backend(backend) == backend
    assert kvcache.simd_backend() == backend
    rng = np.random.default_rng(2)
    k = rng.standard_normal((2, 37, 3, 7), dtype=np.float32)
    v = rng.standard_normal((2, 37, 3, 7), dtype=np.float32)
    with kvcache.TieredKVCache(n_layers=2, n_kv_heads=3, head_dim=7, max_seq_len=64) as c:
        c.store_layers(k, v)
        c.store_batch(1, k[0, ::3], v[0, ::3])  # strided tokens: one copy per row
        gk, gv = c.get(1)
    np.testing.assert_array_equal(gk, np.concatenate([k[1], k[0, ::3]]))
    np.testing.assert_array_equal(gv, np.concatenate([v[1], v[0, ::3]]))


def _run(env_value):
    env = dict(os.environ, KVCACHE_SIMD=env_value)
    return subprocess.run([sys.executable, "-c", "import kvcache; print(kvcache.simd_backend())"],
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_env_var_forces_a_path(backend):
    r = _run(backend)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == backend


def test_env_var_auto_and_bad_values():
    r = _run("auto")
    assert r.returncode == 0 and r.stdout.strip() in kvcache.available_backends()
    r = _run("bogus")
    assert r.returncode != 0
    assert "KVCACHE_SIMD='bogus'" in r.stderr and "unknown SIMD backend" in r.stderr
