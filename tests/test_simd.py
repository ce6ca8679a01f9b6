"""The SIMD paths (copy, CRC32C, add_rows) against the scalar oracle, and forcing a path."""
import os

import numpy as np
import pytest

import kvcache
from helpers import run_python
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
    return run_python("-c", "import kvcache; print(kvcache.simd_backend())", ok=False,
                      env=dict(os.environ, KVCACHE_SIMD=env_value))


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


# RFC 3720 (iSCSI), B.4
CRC32C_KNOWN = [(b"123456789", 0xE3069283), (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43)]
# The SSE4.2 CRC runs three streams over blocks of 256 and 4096 bytes: lengths around 3x those.
CRC32C_LONG = [767, 768, 769, 12287, 12288, 12289, 12288 + 768 + 13, 7 * 12288 + 5 * 768 + 7,
               1 << 20]


@pytest.fixture(scope="module")
def crc_data():
    return memoryview(np.random.default_rng(3).integers(0, 256, (1 << 20) + 16, np.uint8).tobytes())


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_crc32c_known_answers(backend):
    for data, want in CRC32C_KNOWN:
        assert _simd.crc32c_with(backend, data) == want
        assert _simd.crc32c_with(backend, bytearray(data)) == want
        assert _simd.crc32c_with(backend, np.frombuffer(data, np.uint8)) == want


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_crc32c_matches_scalar(backend, crc_data):
    for n in range(301):
        for off in range(16):  # every misalignment of the start
            piece = crc_data[off:off + n]
            assert _simd.crc32c_with(backend, piece) == _simd.crc32c_with("scalar", piece), (n, off)
    for n in CRC32C_LONG:
        for off in (0, 5, 8, 13):
            piece = crc_data[off:off + n]
            assert _simd.crc32c_with(backend, piece) == _simd.crc32c_with("scalar", piece), (n, off)


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_crc32c_chains(backend, crc_data):
    data = crc_data[:3 * 4096 + 1000]
    whole = _simd.crc32c_with("scalar", data)
    for split in range(0, len(data) + 1, 97):
        head, tail = data[:split], data[split:]
        assert _simd.crc32c_with(backend, tail, _simd.crc32c_with(backend, head)) == whole
        assert _simd.crc32c_with("scalar", tail, _simd.crc32c_with(backend, head)) == whole


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_crc32c_uses_the_path_in_use(backend, restore_backend, crc_data):
    kvcache.set_simd_backend(backend)
    assert _simd.crc32c(b"123456789") == 0xE3069283
    assert _simd.crc32c(crc_data) == _simd.crc32c_with("scalar", crc_data)


def test_crc32c_reads_any_contiguous_buffer():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert _simd.crc32c(a) == _simd.crc32c(a.tobytes())
    assert _simd.crc32c(b"") == 0 and _simd.crc32c(b"", 0x1234) == 0x1234
    with pytest.raises(ValueError, match="contiguous"):
        _simd.crc32c(a[:, ::2])
    with pytest.raises(TypeError):
        _simd.crc32c("text")
    with pytest.raises(OverflowError):
        _simd.crc32c(b"", 2**32)


def _floats(rng, n):
    """float32 of mixed magnitudes, so that adding in another order rounds differently,
    with infinities, NaNs, signed zeros, subnormals and sums that overflow."""
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-8, 9, n)).astype(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-40, 3e38, -3e38], np.float32)
    pick = rng.random(n) < 0.03
    x[pick] = rng.choice(special, pick.sum())
    return x


def _assert_same_floats(got, want):
    np.testing.assert_array_equal(got, want)  # NaN == NaN, whatever its payload
    assert (np.isnan(want) | (got.view(np.uint32) == want.view(np.uint32))).all()  # -0.0 != 0.0


def _check_add_rows(backend, init, rows, acc_off):
    """add_rows on one path against scalar (guards around acc included) and numpy."""
    n = init.shape[0]
    want = np.full(n + 32, 7, np.float32)
    want[acc_off:acc_off + n] = init
    got = want.copy()
    _simd.add_rows_with("scalar", want[acc_off:acc_off + n], rows)
    _simd.add_rows_with(backend, got[acc_off:acc_off + n], rows)
    _assert_same_floats(got, want)
    ref = init.copy()
    with np.errstate(all="ignore"):  # inf - inf and overflow are part of the test
        for row in rows:  # float32 adds, one row after the other
            ref += row
    _assert_same_floats(got[acc_off:acc_off + n], ref)


@pytest.mark.parametrize("backend", kvcache.available_backends())
def test_add_rows_matches_scalar_and_numpy(backend):
    rng = np.random.default_rng(4)
    pool, inits = _floats(rng, 20 * (70 + 12) + 16), _floats(rng, 70)  # rows at any stride, offset
    for n_rows in range(1, 21):
        for n_cols in range(71):
            stride = n_cols + (n_rows + n_cols) % 5 * 3
            start = (n_rows * 7 + n_cols) % 16
            rows = pool[start:start + n_rows * stride].reshape(n_rows, stride)[:, :n_cols]
            _check_add_rows(backend, inits[:n_cols], rows, (n_rows + 3 * n_cols) % 16)
    for acc_off, start in [(0, 0), (1, 3)]:  # rows of attention weights, one per head and query
        rows = _floats(rng, 37 * 4104 + 3)[start:start + 37 * 4104].reshape(37, 4104)[:, :4099]
        _check_add_rows(backend, _floats(rng, 4099), rows, acc_off)


def test_add_rows_rejects_bad_arrays():
    acc, rows = np.zeros(8, np.float32), np.ones((3, 8), np.float32)
    read_only = np.zeros(8, np.float32)
    read_only.flags.writeable = False
    for a, r in [
        (acc.astype(np.float64), rows), (acc, rows.astype(np.float64)),
        (np.zeros((2, 4), np.float32), rows), (acc, rows[0]),
        (np.zeros(16, np.float32)[::2], rows), (acc, np.ones((8, 3), np.float32).T),
        (np.zeros(7, np.float32), rows), (acc, rows[::-1]),
        (acc, np.broadcast_to(rows[0], (3, 8))), (rows[1], rows), (read_only, rows),
    ]:
        with pytest.raises(ValueError):
            _simd.add_rows_with("scalar", a, r)
    _simd.add_rows_with("scalar", acc, rows[:0])
    _simd.add_rows_with("scalar", acc[:0], rows[:, :0])
    assert not acc.any()
