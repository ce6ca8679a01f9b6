"""Plain-numpy references for the stored dtypes: what a store then a float32 get must return."""
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


# numpy's float16 casts are kvcache's reference except for NaNs, where numpy's
# result depends on the machine: its software conversion (x86-64) keeps the
# payload and a signalling NaN stays signalling, as kvcache does everywhere;
# on AArch64 numpy converts with FCVT, which quiets signalling NaNs (and flags
# "invalid").  These two give the documented NaN bits on every machine.

def f32_to_f16(x):
    """float32 -> float16: numpy's astype(np.float16); a NaN keeps the top 10 bits
    of its payload (0x7c00 | mant >> 13, made 0x7c01 if that is inf), sign kept."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):  # overflow to inf is the documented rounding
        h = x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    payload = np.maximum((u >> 13) & 0x3FF, 1).astype(np.uint16)
    return np.where(nan, ((u >> 16) & 0x8000).astype(np.uint16) | 0x7C00 | payload,
                    h).view(np.float16)


def f16_to_f32(h):
    """float16 -> float32: exact; a NaN's payload is shifted up, not quieted."""
    h = np.asarray(h, np.float16)
    with np.errstate(all="ignore"):
        f = h.astype(np.float32).view(np.uint32)
    u = h.view(np.uint16).astype(np.uint32)
    nan = (u & 0x7FFF) > 0x7C00
    return np.where(nan, ((u & 0x8000) << 16) | 0x7F800000 | ((u & 0x3FF) << 13),
                    f).view(np.float32)


def quantize(x):
    """int8 per (token, head), as documented: scale = max|x| / 127 (float32), q =
    rint(x / scale) clipped to +-127; an all-zero group has scale 0 and q 0; a
    group holding inf or NaN has scale NaN (0x7fc00000) and q 0."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        m = np.abs(x).max(axis=-1)
        scale = (m / np.float32(127)).astype(np.float32)
        bad = ~np.isfinite(x).all(axis=-1)
        scale = np.where(bad, np.uint32(0x7FC00000).view(np.float32), scale)
        q = np.rint(x / scale[..., None])
        q = np.where((scale[..., None] == 0) | bad[..., None], 0, q)
        return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize(q, scale):
    with np.errstate(all="ignore"):
        return (q.astype(np.float32) * scale[..., None]).astype(np.float32)


def stored(x, dtype):
    """The stored representation of float inputs ``x`` ([..., H, D])."""
    x = np.asarray(x).astype(np.float32)
    with np.errstate(all="ignore"):  # overflow to inf is the documented rounding
        if dtype == "float32":
            return x
        if dtype == "float16":
            return f32_to_f16(x)
        if dtype == "bfloat16":
            return x.astype(BF16)
    return quantize(x)


def widened(s, dtype):
    """float32 values of a stored representation."""
    if dtype == "int8":
        return dequantize(*s)
    if dtype == "float16":
        return f16_to_f32(s)
    return np.asarray(s).astype(np.float32)


def roundtrip(x, dtype, cold_dtype=None):
    """What get() returns for ``x`` stored as ``dtype`` (then moved to ``cold_dtype``)."""
    y = widened(stored(x, dtype), dtype)
    return y if cold_dtype in (None, dtype) else widened(stored(y, cold_dtype), cold_dtype)
