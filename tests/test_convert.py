"""The conversion kernels (f32 <-> f16, f32 <-> bf16) and int8 groups on every SIMD path.

Each path against numpy's float16 and ml_dtypes' bfloat16, bit for bit (NaN
payloads too: for float16 NaNs, numpy's software conversion, which reference.py
spells out because numpy on AArch64 converts in hardware, quieting signalling
NaNs), and against the scalar oracle.  tests/c checks the same
kernels over wider grids, natively and under qemu for NEON.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvcache
from helpers import DETERMINISTIC
from kvcache import _simd
from reference import f16_to_f32, f32_to_f16

BACKENDS = kvcache.available_backends()
BF16 = ml_dtypes.bfloat16
OUT = {"f32_f16": np.float16, "f16_f32": np.float32, "f32_bf16": np.uint16, "bf16_f32": np.float32}
SRC = {"f32_f16": np.float32, "f16_f32": np.float16, "f32_bf16": np.float32, "bf16_f32": np.uint16}


def bits(a):
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32)


def f32(u32):
    return np.asarray(u32, np.uint32).view(np.float32)


def convert(backend, kind, src):
    dst = np.empty(len(src), OUT[kind])
    _simd.convert_with(backend, kind, dst, src)
    return bits(dst)


def numpy_f16(x):
    return bits(f32_to_f16(x))


def ml_bf16(x):
    with np.errstate(all="ignore"):  # ml_dtypes flags NaN inputs as invalid
        return x.astype(BF16).view(np.uint16)


ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
FINITE_HALVES = ALL16[(ALL16 & 0x7c00) != 0x7c00]


def around(x):
    """x and its float32 neighbours on both sides."""
    x = np.asarray(x, np.float32)
    return np.concatenate([x, np.nextafter(x, np.float32(np.inf)),
                           np.nextafter(x, np.float32(-np.inf))])


def nans():
    """NaNs of both signs, quiet and signalling, with payloads from 1 bit up."""
    payloads = np.array([1, 2, 0x1000, 0x1fff, 0x2000, 0x3fff, 0x7fff, 0x8000, 0xffff, 0x10000,
                         0x1fe000, 0x200000, 0x3fffff, 0x400000, 0x400001, 0x7fe000, 0x7fffff],
                        np.uint32)
    return f32(np.concatenate([0x7f800000 | payloads, 0xff800000 | payloads]))


FLOAT32_EDGES = np.concatenate([f32([
    0, 0x80000000, 1, 0x80000001, 0x007fffff, 0x807fffff, 0x00800000, 0x80800000,  # +-0, subnormals
    0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000,  # FLT_MAX, inf
]), around([65504, 65520, -65504, -65520, 65536, 1e5, -1e5, 1e38,  # f16 overflow
            2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-15, -(2.0**-25),  # f16 subnormals
            2.0**-126, 2.0**-133, 3.3895314e38, 1.0, -1.0, 1 / 3]), nans()])


def random_bit_patterns(n, seed):
    return f32(np.random.default_rng(seed).integers(0, 1 << 32, n, dtype=np.uint32))


# -- f16 ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_f16_to_f32_all_halves(backend):
    halves = ALL16.view(np.float16)
    got = convert(backend, "f16_f32", halves)
    np.testing.assert_array_equal(got, bits(f16_to_f32(halves)))  # NaN payloads shifted
    assert (convert(backend, "f32_f16", f32(got)) == ALL16).all()  # and back, NaNs included


def f16_midpoints():
    """Halfway between each finite half and the next one away from zero, both signs:
    every tie rounds to the even neighbour (also to 0x0000 and into inf at 65520)."""
    lo = FINITE_HALVES.view(np.float16).astype(np.float64)
    hi = (FINITE_HALVES + 1).view(np.float16).astype(np.float64)  # 0x7bff + 1 is inf
    top = (FINITE_HALVES & 0x7fff) == 0x7bff
    hi[top] = np.copysign(65536.0, lo[top])
    return around((lo + hi) / 2)  # exact in float32 (12 significant bits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["halves", "midpoints", "edges", "random"])
def test_f32_to_f16_matches_numpy(backend, inputs):
    x = {"halves": lambda: FINITE_HALVES.view(np.float16).astype(np.float32),
         "midpoints": f16_midpoints,
         "edges": lambda: FLOAT32_EDGES,
         "random": lambda: random_bit_patterns(1_000_000, 5)}[inputs]()
    np.testing.assert_array_equal(convert(backend, "f32_f16", x), numpy_f16(x))


def test_the_float16_reference_is_numpy_but_for_signalling_nans():
    """reference.py departs from numpy's casts only where they depend on the
    machine: at signalling NaNs, which hardware conversions quiet."""
    x = np.concatenate([FLOAT32_EDGES, random_bit_patterns(100_000, 6)])
    u = bits(x)
    quiet = ((u & 0x7fffffff) <= 0x7f800000) | ((u & 0x400000) != 0)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(numpy_f16(x)[quiet], bits(x.astype(np.float16))[quiet])
    h = ALL16.view(np.float16)
    quiet = ((ALL16 & 0x7fff) <= 0x7c00) | ((ALL16 & 0x200) != 0)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(bits(f16_to_f32(h))[quiet], bits(h.astype(np.float32))[quiet])


# -- bf16 ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_to_f32_all_patterns(backend):
    got = convert(backend, "bf16_f32", ALL16)
    np.testing.assert_array_equal(got, ALL16.astype(np.uint32) << 16)
    np.testing.assert_array_equal(got, bits(ALL16.view(BF16).astype(np.float32)))
    back = convert(backend, "f32_bf16", f32(got))
    nan = (ALL16 & 0x7fff) > 0x7f80
    np.testing.assert_array_equal(back[~nan], ALL16[~nan])
    np.testing.assert_array_equal(back[nan], (ALL16[nan] & 0x8000) | 0x7fc0)  # ml_dtypes' NaN


def bf16_midpoints():
    """Halfway between each finite bf16 and the next one away from zero (into inf too)."""
    finite = ALL16[(ALL16 & 0x7f80) != 0x7f80].astype(np.uint32)
    return around(f32((finite << 16) | 0x8000))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["bf16", "midpoints", "edges", "random"])
def test_f32_to_bf16_matches_ml_dtypes(backend, inputs):
    x = {"bf16": lambda: f32(ALL16.astype(np.uint32) << 16),
         "midpoints": bf16_midpoints,
         "edges": lambda: FLOAT32_EDGES,
         "random": lambda: random_bit_patterns(1_000_000, 6)}[inputs]()
    np.testing.assert_array_equal(convert(backend, "f32_bf16", x), ml_bf16(x))


def test_bf16_nan_and_subnormal_rules():
    """What the scalar oracle copies from ml_dtypes: one quiet NaN per sign, no flush."""
    assert ml_bf16(nans()).tolist() == [0x7fc0] * 17 + [0xffc0] * 17
    assert ml_bf16(f32([0x8000, 0x8001, 0x18000, 0x7fffff, 0x807fffff])).tolist() == \
        [0, 1, 2, 0x80, 0x8080]


# -- heads, tails, misalignment ------------------------------------------------

LENGTHS = list(range(71)) + [127, 128, 129, 1000, 4099]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(OUT))
def test_every_length_and_misalignment(backend, kind):
    # Inputs rich in NaNs and subnormals, so that the vectors redone in scalar
    # land anywhere in the head, the body and the tail.
    pool = np.random.default_rng(7).integers(0, 1 << 32, 4099 + 32, dtype=np.uint32)
    every5 = pool[::5]
    pool[::5] = (every5 & 0x807fffff) | np.where(every5 & 1, np.uint32(0x7f800000), np.uint32(0))
    src_pool = pool.view(np.float32) if SRC[kind] == np.float32 else \
        pool.astype(np.uint16).view(SRC[kind])
    for n in LENGTHS:
        for off in range(16):
            src = src_pool[off:off + n]
            doff = (off * 7 + n) % 16
            want = np.full((n + 32) * np.dtype(OUT[kind]).itemsize, 0x5a, np.uint8).view(OUT[kind])
            got = want.copy()
            _simd.convert_with("scalar", kind, want[doff:doff + n], src)
            _simd.convert_with(backend, kind, got[doff:doff + n], src)
            assert bits(got).tobytes() == bits(want).tobytes(), (n, off, doff)


def test_convert_accepts_bfloat16_arrays():
    x = np.array([1.0, -2.5, 3.140625, np.inf], np.float32)
    b = np.empty(4, BF16)
    _simd.convert_with("scalar", "f32_bf16", b, x)
    np.testing.assert_array_equal(b.view(np.uint16), ml_bf16(x))
    out = np.empty(4, np.float32)
    _simd.convert_with("scalar", "bf16_f32", out, b)
    np.testing.assert_array_equal(out, x)


def test_convert_rejects_bad_arrays():
    f, h, u = np.zeros(8, np.float32), np.zeros(8, np.float16), np.zeros(8, np.uint16)
    read_only = np.zeros(8, np.float16)
    read_only.flags.writeable = False
    buf = np.zeros(16, np.float32)
    bad = [
        ("f32_f16", u, f), ("f32_f16", h, f.astype(np.float64)), ("f32_f16", h[:7], f),
        ("f32_f16", h.reshape(2, 4), f.reshape(2, 4)),
        ("f32_f16", np.zeros(16, np.float16)[::2], f),
        ("f32_f16", h, buf[::2]), ("f32_f16", read_only, f), ("f32_f16", list(h), f),
        ("f32_bf16", h, f), ("bf16_f32", f, h), ("f16_f32", f, u), ("f32_f32", f, f),
        ("f32_f16", h, f.astype(">f4")), ("f32_f16", buf[4:12].view(np.float16)[:8], buf[:8]),
    ]
    for kind, dst, src in bad:
        with pytest.raises(ValueError):
            _simd.convert_with("scalar", kind, dst, src)
    with pytest.raises(ValueError, match="not available|unknown"):
        _simd.convert_with("mmx", "f32_f16", h, f)
    _simd.convert_with("scalar", "f32_f16", h[:0], f[:0])


# -- int8 groups ---------------------------------------------------------------

def quant_ref(x):
    """include/kvc_simd.h's definition in numpy: float32 division, rint, clamp."""
    amax = (bits(x) & 0x7fffffff).max(axis=1, initial=0)
    with np.errstate(all="ignore"):
        scale = amax.view(np.float32) / np.float32(127)
        scale[amax >= 0x7f800000] = f32(0x7fc00000)  # an inf or a NaN in the group
        q = np.rint(np.clip(x / scale[:, None], -127, 127))
    q[~(scale > 0)] = 0
    return q.astype(np.int8), scale


def assert_quant_all_paths(x):
    """Every path gives the reference's q and scales to the bit, and the same dequant."""
    q_ref, s_ref = quant_ref(x)
    with np.errstate(over="ignore"):  # FLT_MAX's group
        deq_ref = q_ref.astype(np.float32) * s_ref[:, None]
    for backend in BACKENDS:
        q, s = _simd.quant_i8_with(backend, x)
        np.testing.assert_array_equal(q, q_ref, err_msg=backend)
        np.testing.assert_array_equal(bits(s), bits(s_ref), err_msg=backend)
        deq = _simd.dequant_i8_with(backend, q, s)
        np.testing.assert_array_equal(bits(deq), bits(deq_ref), err_msg=backend)
    return q_ref, s_ref, deq_ref


def group_data(rng, n_groups, group):
    """Groups of mixed kinds: normal magnitudes, huge, tiny (subnormal scale),
    all zeros, exact ties (scale 1), and groups with an inf or a NaN."""
    x = (rng.standard_normal((n_groups, group)) *
         2.0 ** rng.integers(-20, 20, (n_groups, 1))).astype(np.float32)
    for g in range(n_groups):
        kind = g % 7
        if kind == 1:
            x[g] = rng.standard_normal(group) * 1e36
        elif kind == 2:
            x[g] = f32(rng.integers(0, 1 << 12, group, dtype=np.uint32)
                       | (rng.integers(0, 2, group, dtype=np.uint32) << 31))
        elif kind == 3:
            x[g] = np.where(rng.random(group) < 0.5, -0.0, 0.0)
        elif kind == 4:
            x[g] = rng.integers(-254, 255, group) / np.float32(2)
            x[g, 0] = 127
        elif kind == 5:
            x[g, rng.integers(group)] = f32([0x7f800000, 0xff800000, 0x7fc00000, 0xff800001])[g % 4]
    return x


@pytest.mark.parametrize("group", list(range(1, 71)) + [128])
def test_quant_matches_reference_on_every_path(group):
    rng = np.random.default_rng(group)
    x = group_data(rng, 14, group)
    q, s, _ = assert_quant_all_paths(x)
    for off in (1, 3):  # misaligned rows
        buf = np.empty(14 * group + off, np.float32)[off:].reshape(14, group)
        buf[...] = x
        assert_quant_all_paths(buf)
    q_bytes = rng.integers(-128, 128, (5, group)).astype(np.int8)  # -128 is never made, but read
    scales = np.array([1.5, 0, np.nan, 3e-39, 1e30], np.float32)
    want = q_bytes.astype(np.float32) * scales[:, None]
    for backend in BACKENDS:
        got = _simd.dequant_i8_with(backend, q_bytes, scales)
        np.testing.assert_array_equal(bits(got), bits(want))


def test_quant_special_groups():
    x = np.array([[0.0, -0.0, 0.0, 0.0],
                  [127, 0.5, 1.5, 2.5],
                  [127, -0.5, -1.5, -126.5],
                  [1.0, np.inf, 2.0, 3.0],
                  [1.0, -2.0, np.nan, 3.0],
                  [1e-45, -1e-45, 0, 0],
                  [np.finfo(np.float32).max, BELOW_MAX, 1, -np.finfo(np.float32).max]], np.float32)
    q, s, deq = assert_quant_all_paths(x)
    assert s[0] == 0 and not q[0].any() and bits(deq[0]).tolist() == [0] * 4  # exact +0.0
    assert s[1] == 1 and q[1].tolist() == [127, 0, 2, 2]  # ties to even
    assert q[2].tolist() == [127, 0, -2, -126]
    assert (bits(s[3:5]) == 0x7fc00000).all() and not q[3:5].any() and np.isnan(deq[3:5]).all()
    assert s[5] == 0 and not q[5].any()  # 1e-45 / 127 underflows
    assert deq[6].tolist() == [np.inf, np.inf, 0, -np.inf]  # 127 * (FLT_MAX / 127) rounds up


def test_quant_shapes_and_bad_arrays():
    for shape in [(0, 4), (3, 0), (0, 0)]:
        q, s = _simd.quant_i8_with("scalar", np.zeros(shape, np.float32))
        assert q.shape == shape and q.dtype == np.int8 and s.shape == (shape[0],)
        assert not s.any()
        assert _simd.dequant_i8_with("scalar", q, s).shape == shape
    x = np.zeros((2, 8), np.float32)
    for bad in [x.astype(np.float64), x[0], x[:, ::2], x.T]:
        with pytest.raises(ValueError):
            _simd.quant_i8_with("scalar", bad)
    q, s = _simd.quant_i8_with("scalar", x)
    for bad_q, bad_s in [(q.astype(np.uint8), s), (q, s[:1]), (q, s.astype(np.float64)),
                         (q[:, ::2], s), (q[0], s)]:
        with pytest.raises(ValueError):
            _simd.dequant_i8_with("scalar", bad_q, bad_s)


BELOW_MAX = float(np.nextafter(np.finfo(np.float32).max, np.float32(0)))


@settings(max_examples=300, deadline=None, derandomize=DETERMINISTIC,
          database=None if DETERMINISTIC else settings.default.database)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 70)),
                  elements=st.floats(-BELOW_MAX, BELOW_MAX, width=32)))
def test_dequant_error_is_at_most_half_a_step(x):
    """|x - x'| <= scale/2, plus the float32 roundings of x/scale and q*scale
    (scale * 2^-16), plus 64 * 2^-149 where the scale is subnormal or 0.
    (Below FLT_MAX: there 127 * scale overflows, see test_quant_special_groups.)"""
    _, s, deq = assert_quant_all_paths(x)
    s64 = s.astype(np.float64)
    bound = s64 / 2 + s64 * 2.0**-16 + np.where(s < np.finfo(np.float32).tiny, 64 * 2.0**-149, 0)
    assert (np.abs(x.astype(np.float64) - deq) <= bound[:, None]).all()
