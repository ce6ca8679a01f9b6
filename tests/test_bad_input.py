"""Bad-input catalogue (issue #7): a cache must never take a malformed argument silently.

Every case calls one public entry point with one malformed argument, on a cache
holding known content (in RAM, tiered with most blocks on disk, float16, bfloat16,
int8, float16 hot over int8 cold, persisted).  It must raise exactly the documented
exception, with a message naming what was expected and what came, and the cache
must afterwards hold exactly what it held before: every layer's length, float32
and stored bytes, the store counters, the persisted index, the SIMD path.  Each
case runs in a forked child (tests/isolate.py): a crash fails that case only.

The tables are per entry point; ``ARRAYS`` (malformed arrays) is applied to every
array argument of every store.  NaN and inf are data, not bad input: see
``test_specials_are_data`` at the end.
"""
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import tempfile
import types
import zlib
from typing import Callable, Optional, Tuple

import numpy as np
import pytest

import kvcache
from helpers import SHAPE, rows
from isolate import isolated, isolated_call
from reference import BF16, f16_to_f32, roundtrip

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
MAX = 24
TIERED = dict(hot_tokens=8, block_tokens=2)
FLAVOURS = {  # CacheConfig overrides; "cold" names a cold_dir under tmp_path
    "ram": {},
    "tiered": dict(TIERED, cold="cold"),
    "f16": dict(dtype="float16"),
    "bf16-tiered": dict(TIERED, dtype="bfloat16", cold="cold"),
    "int8-tiered": dict(TIERED, dtype="int8", cold="cold"),
    "f16-int8": dict(TIERED, dtype="float16", cold_dtype="int8", cold="cold"),
    "persist": dict(TIERED, cold="cold", persist=True),
}
ALL = tuple(FLAVOURS)
ONE = ("tiered",)                          # for checks made before the cache is touched


# -- the cache under test -------------------------------------------------------------------

def special(x):
    """Put NaN (a payload), inf, -0.0 and a denormal in token 0 of every layer."""
    x[..., 0, 0, :] = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32)
    x.view(np.uint32)[..., 0, 0, 0] = 0x7FC12345
    return x


class Ctx:
    """A cache of one flavour holding known content: layer l has 12 + l + 1 positions."""

    def __init__(self, flavour, tmp_path):
        opts = dict(FLAVOURS[flavour])
        self.flavour, self.tmp = flavour, tmp_path
        self.cold_dir = tmp_path / opts.pop("cold") if "cold" in opts else None
        self.cache = kvcache.TieredKVCache(max_seq_len=MAX, cold_dir=self.cold_dir, **opts, **SHAPE)
        self.sentinels = []
        self.fill()

    def fill(self):
        c = self.cache
        c.store_layers(special(rows(12, layers=L, seed=1)), rows(12, layers=L, seed=2))
        if c.config.persist:
            c.flush()  # the index then promises 12 positions; the rest is not flushed
        for l in range(L):
            c.store(l, rows(l + 1, seed=10 + l), rows(l + 1, seed=20 + l))

    def tok(self, n=3, dtype=np.float32):
        return rows(n, seed=30 + n).astype(dtype)

    def layers(self, n=3):
        return rows(n, layers=L, seed=40 + n)

    def out(self, n=None, dtype=np.float32):
        """A (keys, values) pair for get(0, out=...), filled with a sentinel that must survive."""
        n = self.cache.layer_len(0) if n is None else n
        pair = tuple(np.full((n, H, D), 7.0).astype(dtype) for _ in range(2))
        self.sentinels.extend(pair)
        return pair

    def close(self):
        self.cache.close()


def as_bytes(x):
    if isinstance(x, tuple):
        return b"".join(as_bytes(a) for a in x)
    return np.ascontiguousarray(x).tobytes()


def snapshot(ctx):
    """Everything the cache holds and shows, byte-exact (NaN-safe: bytes, not floats)."""
    c, s = ctx.cache, {"simd": kvcache.simd_backend()}
    if c.closed:
        if not c.config.persist:
            return s
        c = kvcache.TieredKVCache.open(ctx.cold_dir)  # a closed persisted cache lives on disk
    else:
        st = c.stats()
        s.update(seq_len=c.seq_len, nbytes=c.nbytes, threads=c.threads, config=c.config,
                 tokens_stored=st["tokens_stored"], bytes_stored=st["bytes_stored"])
        if c.config.persist:
            s["index.json"] = (ctx.cold_dir / "index.json").read_bytes()
    for l in range(L):
        s[f"layer {l} length"] = c.layer_len(l)
        s[f"layer {l} keys+values"] = as_bytes(c.get(l))
        if c.config.dtype == c.config.cold_format:
            s[f"layer {l} stored"] = as_bytes(c.get(l, raw=True))
    if c is not ctx.cache:
        c.close()
    return s


def assert_unchanged(before, after):
    changed = sorted(k for k in before.keys() | after.keys()
                     if k in before and k in after and before[k] != after[k])
    assert not changed, f"the failed call changed: {changed}"


# -- the catalogue --------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    call: Callable[[Ctx], object]
    exc: type
    match: str
    flavours: Tuple[str, ...] = ALL
    after: Optional[Callable[[Ctx], None]] = None  # a further check once the snapshot matched
    local: bool = False  # needs torch: runs in a fork of the test process, not of the fork server


def cases(prefix, table, call, flavours=ALL):
    """Cases ``prefix name`` calling ``call(ctx, value)`` for each ``(name, value, exc, match)``."""
    return [Case(f"{prefix} {name}", lambda ctx, v=value: call(ctx, v(ctx) if callable(v) else v),
                 exc, match, flavours) for name, value, exc, match in table]


def misaligned(a):
    return np.frombuffer(b"\0" + a.tobytes(), a.dtype, offset=1).reshape(a.shape)


DTYPE = r"{arg}: expected dtype float32, float16 or bfloat16, got "
NOT_ARRAY = r"{arg}: expected a float32 array \(numpy array, torch CPU tensor or buffer\), got "
SHAPE_ = r"{arg}: expected shape .*, got "

# Malformed versions of a good [..., H, D] float32 array: (name, make(a), exc, match).
ARRAYS = [
    ("float64", lambda a: a.astype(np.float64), TypeError, DTYPE + "float64"),
    ("int32", lambda a: a.astype(np.int32), TypeError, DTYPE + "int32"),
    ("int8", lambda a: a.astype(np.int8), TypeError, DTYPE + "int8"),
    ("bool", lambda a: a > 0, TypeError, DTYPE + "bool"),
    ("object", lambda a: a.astype(object), TypeError, DTYPE + "object"),
    ("complex64", lambda a: a.astype(np.complex64), TypeError, DTYPE + "complex64"),
    ("big-endian", lambda a: a.astype(">f4"), TypeError, DTYPE + ">f4"),
    ("list", lambda a: a.tolist(), TypeError, NOT_ARRAY + "list"),
    ("None", lambda a: None, TypeError, NOT_ARRAY + "NoneType"),
    ("bytes", lambda a: a.tobytes(), TypeError, NOT_ARRAY + "bytes"),
    ("str", lambda a: "keys", TypeError, NOT_ARRAY + "str"),
    ("float", lambda a: 1.5, TypeError, NOT_ARRAY + "float"),
    ("0-d", lambda a: np.float32(1.5), ValueError, SHAPE_ + r"\[\]"),
    ("rank+1", lambda a: a[None], ValueError, SHAPE_ + r"\[1, "),
    ("flat rows", lambda a: a.reshape(*a.shape[:-2], H * D), ValueError, SHAPE_ + rf"\[.*{H * D}\]"),
    ("head_dim-1", lambda a: a[..., :-1], ValueError, SHAPE_ + rf"\[.*{H}, {D - 1}\]"),
    ("heads-1", lambda a: a[..., :-1, :], ValueError, SHAPE_ + rf"\[.*{H - 1}, {D}\]"),
    ("zero tokens", lambda a: a[..., :0, :, :], ValueError, r"{arg}: expected at least one token, got 0"),
    ("fortran", np.asfortranarray, ValueError, r"{arg}: expected the last two dimensions .* C-contiguous, got strides"),
    ("strided head_dim", lambda a: np.repeat(a, 2, axis=-1)[..., ::2], ValueError, "C-contiguous, got strides"),
    ("strided heads", lambda a: np.repeat(a, 2, axis=-2)[..., ::2, :], ValueError, "C-contiguous, got strides"),
    ("misaligned", misaligned, ValueError, r"{arg}: expected an aligned array, got one at a misaligned"),
]
try:
    if os.environ.get("KVCACHE_TEST_SERVER"):  # the fork server (tests/isolate.py) runs without torch
        raise ImportError
    import torch
    import kvcache.integrations.transformers  # noqa: F401 (imported before the forks, not in each child)
except ImportError:
    torch = None
TORCH_ARRAYS = []  # the same, as torch tensors
if torch is not None:
    TORCH_ARRAYS += [
        ("torch float64", lambda a: torch.from_numpy(a).double(), TypeError, DTYPE + "float64"),
        ("torch int64", lambda a: torch.from_numpy(a).long(), TypeError, DTYPE + "int64"),
        ("torch requires_grad", lambda a: torch.from_numpy(a.copy()).requires_grad_(), TypeError,
         r"{arg}: cannot view Tensor as a float CPU array"),
        ("torch meta", lambda a: torch.empty(a.shape, device="meta"), TypeError,
         r"{arg}: cannot view Tensor as a float CPU array"),
        ("torch bfloat16 requires_grad", lambda a: torch.from_numpy(a).bfloat16().requires_grad_(), TypeError,
         r"{arg}: cannot view Tensor as a float CPU array \(Can't call numpy\(\) on Tensor that requires grad"),
        ("torch bfloat16 meta", lambda a: torch.empty(a.shape, dtype=torch.bfloat16, device="meta"), TypeError,
         r"{arg}: cannot view Tensor as a float CPU array"),
        ("torch bfloat16 negative view", lambda a: torch.from_numpy(a).bfloat16()._neg_view(), TypeError,
         r"{arg}: cannot view Tensor as a float CPU array"),
        ("torch transposed", lambda a: torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, -1, -2)))
         .transpose(-1, -2), ValueError, "C-contiguous, got strides"),
    ]


def store_cases(method, good, flavours):
    """ARRAYS on keys and on values of ``method(layer, k, v)`` or ``store_layers(k, v)``."""
    out = []
    for arg in ("keys", "values"):
        def call(ctx, make, arg=arg):
            k, v = good(ctx), good(ctx)
            k, v = (make(k), v) if arg == "keys" else (k, make(v))
            return getattr(ctx.cache, method)(k, v) if method == "store_layers" else \
                getattr(ctx.cache, method)(1, k, v)
        out += [Case(f"{method} {arg} {name}", lambda ctx, m=make, c=call: c(ctx, m), exc,
                     match.format(arg=arg), flavours, local=(name, make, exc, match) in TORCH_ARRAYS)
                for name, make, exc, match in ARRAYS + TORCH_ARRAYS]
    return out


BAD_LAYERS = [  # (name, layer, exc, match)
    ("n_layers", L, IndexError, rf"layer: expected 0 <= layer < {L}, got {L}"),
    ("-1", -1, IndexError, rf"layer: expected 0 <= layer < {L}, got -1"),
    ("2**80", 1 << 80, IndexError, rf"layer: expected 0 <= layer < {L}, got"),
    ("float", 1.0, TypeError, "layer: expected an int, got float"),
    ("np.float64", np.float64(1), TypeError, "layer: expected an int, got float64"),
    ("str", "1", TypeError, "layer: expected an int, got str"),
    ("None", None, TypeError, "layer: expected an int, got NoneType"),
    ("bool", True, TypeError, "layer: expected an int, got bool"),
]
LAYER_CALLS = {
    "store": lambda c, l, ctx: c.store(l, ctx.tok(1)[0], ctx.tok(1)[0]),
    "store_batch": lambda c, l, ctx: c.store_batch(l, ctx.tok(), ctx.tok()),
    "get": lambda c, l, ctx: c.get(l),
    "layer_len": lambda c, l, ctx: c.layer_len(l),
    "update_scores": lambda c, l, ctx: c.update_scores(l, np.ones(1, np.float32)),
}

PAIRS = [  # keys and values that do not match each other: (name, call(ctx), exc, match)
    ("store T=3 vs 2", lambda ctx: ctx.cache.store(0, ctx.tok(3), ctx.tok(2)),
     ValueError, "values: expected 3 tokens like keys, got 2"),
    ("store batch vs one token", lambda ctx: ctx.cache.store(0, ctx.tok(3), ctx.tok(1)[0]),
     ValueError, "values: expected 3 tokens like keys, got 1"),
    ("store float32 vs float16", lambda ctx: ctx.cache.store(0, ctx.tok(), ctx.tok(dtype=np.float16)),
     TypeError, r"values: expected the dtype of keys \(float32\), got float16"),
    ("store float16 vs bfloat16", lambda ctx: ctx.cache.store(0, ctx.tok(dtype=np.float16), ctx.tok(dtype=BF16)),
     TypeError, r"values: expected the dtype of keys \(float16\), got bfloat16"),
    ("store_batch one token", lambda ctx: ctx.cache.store_batch(0, ctx.tok(1)[0], ctx.tok(1)[0]),
     ValueError, rf"keys: expected shape \[T, {H}, {D}\] \(rank 3\), got \[{H}, {D}\]"),
    ("store_layers layers 3 vs 2", lambda ctx: ctx.cache.store_layers(ctx.layers(), ctx.layers()[:2]),
     ValueError, rf"keys/values: expected {L} layers on axis 0, got {L} and 2"),
    ("store_layers layers 4", lambda ctx: ctx.cache.store_layers(*[rows(2, layers=L + 1)] * 2),
     ValueError, rf"keys/values: expected {L} layers on axis 0, got {L + 1} and {L + 1}"),
    ("store_layers T=3 vs 2", lambda ctx: ctx.cache.store_layers(ctx.layers(3), ctx.layers(2)),
     ValueError, "values: expected 3 tokens like keys, got 2"),
    ("store_layers rank 3", lambda ctx: ctx.cache.store_layers(ctx.tok(), ctx.tok()),
     ValueError, rf"keys: expected shape \[n_layers, T, {H}, {D}\] \(rank 4\), got \[3, {H}, {D}\]"),
    ("store_layers float32 vs bfloat16", lambda ctx: ctx.cache.store_layers(ctx.layers(), ctx.layers().astype(BF16)),
     TypeError, r"values: expected the dtype of keys \(float32\), got bfloat16"),
]

FULL = rf"holds {{}} positions; {{}} more would exceed max_seq_len={MAX} \(nothing was stored\)"
HUGE = 1 << 40
CAPACITY = [  # more positions than max_seq_len: (name, call(ctx), exc, match)
    ("store one too many", lambda ctx: ctx.cache.store(0, ctx.tok(MAX - 12), ctx.tok(MAX - 12)),
     kvcache.CacheFullError, "layer 0 " + FULL.format(13, MAX - 12)),
    ("store_batch one too many", lambda ctx: ctx.cache.store_batch(2, ctx.tok(MAX - 14), ctx.tok(MAX - 14)),
     kvcache.CacheFullError, "layer 2 " + FULL.format(15, MAX - 14)),
    ("store_layers one layer too many", lambda ctx: ctx.cache.store_layers(ctx.layers(MAX - 14), ctx.layers(MAX - 14)),
     kvcache.CacheFullError, "layer 2 " + FULL.format(15, MAX - 14)),
    ("store 2**40 broadcast tokens", lambda ctx: ctx.cache.store(
        0, *[np.broadcast_to(ctx.tok(1)[0], (HUGE, H, D))] * 2),
     kvcache.CacheFullError, "layer 0 " + FULL.format(13, HUGE)),
    ("store_layers 2**40 broadcast tokens", lambda ctx: ctx.cache.store_layers(
        *[np.broadcast_to(ctx.tok(1)[0], (L, HUGE, H, D))] * 2),
     kvcache.CacheFullError, "layer 2 " + FULL.format(15, HUGE)),
]

POSITIONS = [  # get(1, start, stop) with bad positions; layer 1 holds 14
    ("start > stop", (5, 3), ValueError, "get: expected start <= stop, got start=5 > stop=3"),
    ("stop beyond", (0, 15), IndexError, "get: stop=15 is outside the 14 positions stored"),
    ("start beyond", (15, None), IndexError, "get: start=15 is outside the 14 positions stored"),
    ("start before -len", (-15, None), IndexError, "get: start=-15 is outside the 14 positions stored"),
    ("stop 2**70", (0, 1 << 70), IndexError, "get: stop=1180591620717411303424 is outside the 14"),
    ("start -2**70", (-(1 << 70), None), IndexError, "get: start=-1180591620717411303424 is outside"),
    ("start float", (1.0, None), TypeError, "get: start expected an int or None, got float"),
    ("stop str", (0, "3"), TypeError, "get: stop expected an int or None, got str"),
    ("stop bool", (0, True), TypeError, "get: stop expected an int or None, got bool"),
    ("start np.float32", (np.float32(0), None), TypeError, "get: start expected an int or None, got float32"),
]

OUT = r"out\[{}\]: "
OUTS = [  # get(0, out=...) with a bad out: (name, make(ctx), exc, match)
    ("one array", lambda ctx: ctx.out()[0], TypeError, r"out: expected a \(keys_out, values_out\) pair, got ndarray"),
    ("1-tuple", lambda ctx: ctx.out()[:1], TypeError, r"out: expected a \(keys_out, values_out\) pair, got tuple"),
    ("3-tuple", lambda ctx: ctx.out() + ctx.out()[:1], TypeError, r"out: expected a \(keys_out, values_out\) pair"),
    ("dict", lambda ctx: dict(enumerate(ctx.out())), TypeError, r"expected a \(keys_out, values_out\) pair, got dict"),
    ("None values", lambda ctx: (ctx.out()[0], None), TypeError, OUT.format(1) + "expected a float32 array .*got NoneType"),
    ("float64", lambda ctx: ctx.out(dtype=np.float64), TypeError, OUT.format(0) + "expected dtype float32, got float64"),
    ("float16", lambda ctx: ctx.out(dtype=np.float16), TypeError, OUT.format(0) + "expected dtype float32, got float16"),
    ("one row short", lambda ctx: (ctx.out()[0], ctx.out(12)[1]), ValueError,
     OUT.format(1) + rf"expected shape \[13, {H}, {D}\], got \[12, {H}, {D}\]"),
    ("flat", lambda ctx: tuple(a.reshape(13, H * D) for a in ctx.out()), ValueError,
     OUT.format(0) + rf"expected shape .*got \[13, {H * D}\]"),
    ("read-only values", lambda ctx: (ctx.out()[0], readonly(ctx.out()[1])),
     ValueError, OUT.format(1) + "expected a writable array, got a read-only one"),
    ("the same array twice", lambda ctx: (ctx.out()[0],) * 2, ValueError, "out: keys_out and values_out overlap"),
    ("overlapping", lambda ctx: overlapping(ctx), ValueError, "out: keys_out and values_out overlap"),
    ("fortran", lambda ctx: (np.asfortranarray(ctx.out()[0]), ctx.out()[1]), ValueError,
     OUT.format(0) + "expected the last two dimensions .* C-contiguous, got strides"),
    ("strided head_dim", lambda ctx: (ctx.out()[0], np.empty((13, H, 2 * D), np.float32)[..., ::2]), ValueError,
     OUT.format(1) + ".*C-contiguous, got strides"),
    ("misaligned", lambda ctx: (ctx.out()[0], np.frombuffer(bytearray(13 * H * D * 4 + 1), np.float32, offset=1)
                                .reshape(13, H, D)), ValueError, OUT.format(1) + "expected an aligned array"),
]


def readonly(a):
    a.flags.writeable = False
    return a


def overlapping(ctx):
    n = ctx.cache.layer_len(0)
    both = np.full((n + 1, H, D), 7.0, np.float32)
    ctx.sentinels.append(both)
    return both[:n], both[1:]


GET_FLAGS = [  # get(0, **kwargs): (name, kwargs(ctx), exc, match, flavours)
    ("copy str", lambda ctx: dict(copy="False"), TypeError, "get: copy expected a bool, got str", ALL),
    ("copy None", lambda ctx: dict(copy=None), TypeError, "get: copy expected a bool, got NoneType", ALL),
    ("raw int", lambda ctx: dict(raw=1), TypeError, "get: raw expected a bool, got int", ALL),
    ("out with raw", lambda ctx: dict(raw=True, out=ctx.out()), ValueError,  # f16-int8 refuses raw first
     "get: out= takes float32 copies; it excludes raw=True and copy=False", tuple(f for f in ALL if f != "f16-int8")),
    ("out with copy=False", lambda ctx: dict(copy=False, out=ctx.out()), ValueError,
     "get: out= takes float32 copies; it excludes raw=True and copy=False", ("ram", "tiered", "persist")),
    ("views of float16 without raw", lambda ctx: dict(copy=False), ValueError,
     r"get\(copy=False\): views show the stored float16; pass raw=True", ("f16",)),
    ("views of int8 without raw", lambda ctx: dict(copy=False), ValueError,
     r"get\(copy=False\): views show the stored int8; pass raw=True", ("int8-tiered", "f16-int8")),
    ("raw of two dtypes", lambda ctx: dict(raw=True), ValueError,
     r"get\(raw=True\): the hot tier stores float16 and the cold tier int8; raw reads need one", ("f16-int8",)),
]

ATTN = [  # update_scores(1, attn): (name, attn(ctx), exc, match)
    ("float64", lambda ctx: np.ones(3), TypeError, "attn: expected dtype float32, got float64"),
    ("float16", lambda ctx: np.ones(3, np.float16), TypeError, "attn: expected dtype float32, got float16"),
    ("list", lambda ctx: [0.5, 0.5], TypeError, "attn: expected dtype float32, got float64"),
    ("None", lambda ctx: None, TypeError, "attn: expected dtype float32, got object"),
    ("rank 2", lambda ctx: np.ones((2, 3), np.float32), ValueError,
     r"attn: expected shape \[n_heads, n_queries, n_positions\] or \[n_positions\], got \[2, 3\]"),
    ("rank 0", lambda ctx: np.float32(1), ValueError, r"attn: expected shape .*, got \[\]"),
    ("more positions than stored", lambda ctx: np.ones((2, 1, 15), np.float32), ValueError,
     r"attn: expected at most 14 positions \(layer 1 holds that many\), got 15"),
]

TRUNCATE = [  # truncate(n)
    ("-1", -1, ValueError, "truncate: expected n >= 0, got -1"),
    ("-2**70", -(1 << 70), ValueError, "truncate: expected n >= 0, got -1180591620717411303424"),
    ("float", 2.0, TypeError, "truncate: expected an int, got float"),
    ("np.float64", np.float64(2), TypeError, "truncate: expected an int, got float64"),
    ("str", "2", TypeError, "truncate: expected an int, got str"),
    ("None", None, TypeError, "truncate: expected an int, got NoneType"),
    ("bool", False, TypeError, "truncate: expected an int, got bool"),
]

THREADS = [  # cache.threads = n
    ("0", 0, ValueError, "threads: expected an int >= 1, got 0"),
    ("-1", -1, ValueError, "threads: expected an int >= 1, got -1"),
    ("2**70", 1 << 70, ValueError, r"threads: expected an int <= \d+, got 1180591620717411303424"),
    ("float", 2.0, TypeError, "threads: expected an int, got float"),
    ("str", "2", TypeError, "threads: expected an int, got str"),
    ("None", None, TypeError, "threads: expected an int, got NoneType"),
    ("bool", True, TypeError, "threads: expected an int, got bool"),
]

CLOSED = {  # every method of a closed cache
    "store": lambda c, ctx: c.store(0, ctx.tok(), ctx.tok()),
    "store_batch": lambda c, ctx: c.store_batch(0, ctx.tok(), ctx.tok()),
    "store_layers": lambda c, ctx: c.store_layers(ctx.layers(), ctx.layers()),
    "get": lambda c, ctx: c.get(0),
    "get out": lambda c, ctx: c.get(0, out=ctx.out(13)),
    "get views": lambda c, ctx: c.get(0, copy=False, raw=True),
    "layer_len": lambda c, ctx: c.layer_len(0),
    "seq_len": lambda c, ctx: c.seq_len,
    "truncate": lambda c, ctx: c.truncate(0),
    "reset": lambda c, ctx: c.reset(),
    "flush": lambda c, ctx: c.flush(),
    "update_scores": lambda c, ctx: c.update_scores(0, np.ones(1, np.float32)),
    "stats": lambda c, ctx: c.stats(),
    "nbytes": lambda c, ctx: c.nbytes,
    "threads": lambda c, ctx: c.threads,
    "threads=": lambda c, ctx: setattr(c, "threads", 1),
    "with": lambda c, ctx: c.__enter__(),
}


def closed_call(call):
    def run(ctx):
        ctx.cache.close()
        call(ctx.cache, ctx)
    return run


BASE = dict(max_seq_len=MAX, **SHAPE)
BIG = 1 << 70
CONFIG = [  # TieredKVCache(**BASE, **kwargs), so CacheConfig too: (name, kwargs, exc, match)
    ("n_layers 0", dict(n_layers=0), ValueError, "CacheConfig.n_layers: expected an int >= 1, got 0"),
    ("n_layers -1", dict(n_layers=-1), ValueError, "CacheConfig.n_layers: expected an int >= 1, got -1"),
    ("n_layers 2.5", dict(n_layers=2.5), TypeError, "CacheConfig.n_layers: expected an int, got float 2.5"),
    ("n_layers str", dict(n_layers="3"), TypeError, "CacheConfig.n_layers: expected an int, got str '3'"),
    ("n_layers bool", dict(n_layers=True), TypeError, "CacheConfig.n_layers: expected an int, got bool"),
    ("n_layers None", dict(n_layers=None), TypeError, "CacheConfig.n_layers: expected an int, got NoneType"),
    ("n_layers 2**70", dict(n_layers=BIG), ValueError, rf"CacheConfig.n_layers: expected an int <= \d+, got {BIG}"),
    ("n_kv_heads 0", dict(n_kv_heads=0), ValueError, "CacheConfig.n_kv_heads: expected an int >= 1, got 0"),
    ("n_kv_heads np.float64", dict(n_kv_heads=np.float64(2)), TypeError, "n_kv_heads: expected an int, got float64"),
    ("head_dim 0", dict(head_dim=0), ValueError, "CacheConfig.head_dim: expected an int >= 1, got 0"),
    ("head_dim 2**70", dict(head_dim=BIG), ValueError, rf"CacheConfig.head_dim: expected an int <= \d+, got {BIG}"),
    ("max_seq_len 0", dict(max_seq_len=0), ValueError, "CacheConfig.max_seq_len: expected an int >= 1, got 0"),
    ("max_seq_len None", dict(max_seq_len=None), TypeError, "max_seq_len: expected an int, got NoneType"),
    ("hot_tokens 0", dict(hot_tokens=0), ValueError, "CacheConfig.hot_tokens: expected an int >= 1, got 0"),
    ("hot_tokens > max_seq_len", dict(hot_tokens=MAX + 1), ValueError,
     f"CacheConfig.hot_tokens: expected at most max_seq_len={MAX}, got {MAX + 1}"),
    ("hot_tokens not whole blocks", dict(hot_tokens=9, block_tokens=2), ValueError,
     "CacheConfig.hot_tokens: expected a multiple of block_tokens=2, got 9"),
    ("hot_tokens below two blocks", dict(hot_tokens=4, block_tokens=4), ValueError,
     r"CacheConfig.hot_tokens: expected at least 8 \(sink blocks \+ 2 blocks of 4\) .*got 4"),
    ("sink_tokens -1", dict(sink_tokens=-1), ValueError, "CacheConfig.sink_tokens: expected an int >= 0, got -1"),
    ("sink_tokens > hot", dict(sink_tokens=MAX + 1), ValueError,
     f"CacheConfig.sink_tokens: expected at most hot_tokens={MAX}, got {MAX + 1}"),
    ("sink blocks crowd the hot tier", dict(hot_tokens=8, block_tokens=2, sink_tokens=5), ValueError,
     r"CacheConfig.hot_tokens: expected at least 10 \(sink blocks \+ 2 blocks of 2\)"),
    ("block_tokens 0", dict(block_tokens=0), ValueError, "CacheConfig.block_tokens: expected an int >= 1, got 0"),
    ("dtype float64", dict(dtype="float64"), ValueError,
     r"CacheConfig.dtype: expected one of \('float32', 'float16', 'bfloat16', 'int8'\), got 'float64'"),
    ("dtype upper case", dict(dtype="FLOAT32"), ValueError, "CacheConfig.dtype: expected one of .*got 'FLOAT32'"),
    ("dtype np.float32", dict(dtype=np.float32), TypeError, "CacheConfig.dtype: expected a str, got type"),
    ("dtype None", dict(dtype=None), TypeError, "CacheConfig.dtype: expected a str, got NoneType"),
    ("cold_dtype int4", dict(cold_dtype="int4"), ValueError, "CacheConfig.cold_dtype: expected one of .*got 'int4'"),
    ("eviction_policy fifo", dict(eviction_policy="fifo"), ValueError,
     r"CacheConfig.eviction_policy: expected one of \('lru', 'adaptive', 'h2o'\), got 'fifo'"),
    ("eviction_policy None", dict(eviction_policy=None), TypeError,
     "CacheConfig.eviction_policy: expected a str, got NoneType"),
    ("cold_dir int", dict(cold_dir=3), TypeError, "CacheConfig.cold_dir: expected a path or None, got int"),
    ("cold_dir empty", dict(cold_dir=""), ValueError, "CacheConfig.cold_dir: expected a path or None, got ''"),
    ("persist without cold_dir", dict(persist=True), ValueError,
     "CacheConfig.persist: expected a cold_dir to persist to, got cold_dir=None"),
    ("persist int", dict(persist=1), TypeError, "CacheConfig.persist: expected a bool, got int"),
    ("prefault str", dict(prefault="yes"), TypeError, "CacheConfig.prefault: expected a bool, got str"),
    ("promote_on_read None", dict(promote_on_read=None), TypeError,
     "CacheConfig.promote_on_read: expected a bool, got NoneType"),
    ("max_cold_bytes -1", dict(max_cold_bytes=-1), ValueError, "CacheConfig.max_cold_bytes: expected an int >= 0, got -1"),
    ("max_cold_bytes 1.5", dict(max_cold_bytes=1.5), TypeError, "CacheConfig.max_cold_bytes: expected an int, got float"),
    ("max_cold_bytes 2**70", dict(max_cold_bytes=BIG), ValueError, rf"max_cold_bytes: expected an int <= \d+, got {BIG}"),
    ("recent_tokens -1", dict(recent_tokens=-1), ValueError, "CacheConfig.recent_tokens: expected an int >= 0, got -1"),
    ("recent_tokens 2**70", dict(recent_tokens=BIG), ValueError, rf"recent_tokens: expected an int <= \d+, got {BIG}"),
    ("threads 0", dict(threads=0), ValueError, "CacheConfig.threads: expected an int >= 1, got 0"),
    ("threads 2**70", dict(threads=BIG), ValueError, rf"CacheConfig.threads: expected an int <= \d+, got {BIG}"),
    ("recency weight nan", dict(adaptive_recency_weight=float("nan")), ValueError,
     "CacheConfig.adaptive_recency_weight: expected a finite number >= 0, got nan"),
    ("recency weight -1", dict(adaptive_recency_weight=-1), ValueError,
     "CacheConfig.adaptive_recency_weight: expected a finite number >= 0, got -1"),
    ("frequency weight inf", dict(adaptive_frequency_weight=float("inf")), ValueError,
     "CacheConfig.adaptive_frequency_weight: expected a finite number >= 0, got inf"),
    ("frequency weight str", dict(adaptive_frequency_weight="16"), TypeError,
     "CacheConfig.adaptive_frequency_weight: expected a number, got str"),
    ("frequency weight bool", dict(adaptive_frequency_weight=True), TypeError,
     "CacheConfig.adaptive_frequency_weight: expected a number, got bool"),
    ("unknown field", dict(colour="red"), TypeError, "unexpected keyword argument 'colour'"),
    ("absurd: more RAM than the machine", dict(n_layers=1 << 20, max_seq_len=1 << 20), MemoryError,
     r"the hot tier needs .* GiB but this machine has .* GiB of RAM; lower hot_tokens or max_seq_len"),
    ("absurd: 2**40 layers", dict(n_layers=1 << 40, prefault=False), MemoryError,
     "cannot allocate the hot tier's bookkeeping"),
    ("absurd: 2**62 floats a row", dict(n_kv_heads=1 << 31, head_dim=1 << 31, prefault=False), MemoryError,
     "larger than this machine can address"),
]


def write_file(path):
    path.write_text("not a directory")
    return path


COLD_DIRS = [  # TieredKVCache(**BASE, cold_dir=make(ctx)): (name, make, exc, match, flavours)
    ("a file", lambda ctx: write_file(ctx.tmp / "f"), NotADirectoryError, "cold_dir is not a directory", ONE),
    ("under a file", lambda ctx: write_file(ctx.tmp / "f") / "sub", NotADirectoryError, "Not a directory", ONE),
    ("a live cache's", lambda ctx: ctx.cold_dir, FileExistsError,
     "cold_dir is not empty; a cache needs a directory of its own", ("tiered", "int8-tiered")),
    ("a persisted cache's", lambda ctx: ctx.cold_dir, FileExistsError,
     r"cold_dir holds a persisted cache; reopen it with TieredKVCache.open\(cold_dir\)", ("persist",)),
]


def persisted_copy(ctx, damage=None):
    """A copy of the persisted flavour's directory (its last flush), optionally damaged."""
    other = ctx.tmp / "copy"
    shutil.copytree(ctx.cold_dir, other)
    if damage:
        damage(other)
    return other


def edit_index(change):
    """A damage: ``change(index)`` (editing it, or returning a replacement), then a valid
    checksum again: what another tool or an edit by hand could leave."""
    def damage(d):
        body = (d / "index.json").read_text().rsplit("\n", 2)[0]
        index = json.loads(body)
        index = change(index) or index
        body = json.dumps(index)
        (d / "index.json").write_text(f"{body}\n{zlib.crc32(body.encode()):08x}\n")
    return damage


def damaged(change):
    return lambda ctx: [persisted_copy(ctx, change)]


DAMAGED = "corrupt cache index "
OPEN = [  # TieredKVCache.open(*args(ctx), **kwargs): (name, args, kwargs, exc, match, flavours)
    ("missing", lambda ctx: [ctx.tmp / "nope"], {}, FileNotFoundError, "no such cache directory", ONE),
    ("a file", lambda ctx: [write_file(ctx.tmp / "f")], {}, NotADirectoryError,
     "not a directory: expected a persisted kvcache directory", ONE),
    ("an empty dir", lambda ctx: [ctx.tmp], {}, FileNotFoundError, "not a persisted kvcache directory", ONE),
    ("a live cache never persisted", lambda ctx: [ctx.cold_dir], {}, FileNotFoundError,
     "not a persisted kvcache directory", ("tiered", "int8-tiered")),
    ("a live persisted cache's", lambda ctx: [ctx.cold_dir], {}, kvcache.ColdStoreError,
     "cold_dir is in use by another open cache", ("persist",)),
    ("a garbled index", lambda ctx: [persisted_copy(ctx, lambda d: (d / "index.json").write_text("{}"))], {},
     kvcache.CorruptionError, "corrupt cache index", ("persist",)),
    ("an index with a crc list short", damaged(edit_index(lambda i: i["layers"][0].update(crc_k=[]))), {},
     kvcache.CorruptionError, DAMAGED + r"\(layer 0: crc_k expected 6 ints for 12 positions, got \[\]\)",
     ("persist",)),
    ("an index length past max_seq_len", damaged(edit_index(lambda i: i["layers"][1].update(length=99))), {},
     kvcache.CorruptionError, DAMAGED + r"\(layer 1: expected a length of 0..max_seq_len=24, got 99\)", ("persist",)),
    ("an index length str", damaged(edit_index(lambda i: i["layers"][1].update(length="12"))), {},
     kvcache.CorruptionError, DAMAGED + r"\(layer 1: expected a length of 0..max_seq_len=24, got '12'\)", ("persist",)),
    ("an index rows wrong", damaged(edit_index(lambda i: i["layers"][2]["rows"].__setitem__(0, 7))), {},
     kvcache.CorruptionError, DAMAGED + r"\(layer 2: rows expected \[2, 2, 2, 2, 2, 2\], got \[7, ", ("persist",)),
    ("an index without layers", damaged(edit_index(lambda i: i.__delitem__("layers"))), {},
     kvcache.CorruptionError, DAMAGED + rf"\(layers: expected a list of {L}, got NoneType", ("persist",)),
    ("an index with an invalid config", damaged(edit_index(lambda i: i["config"].update(head_dim=0))), {},
     kvcache.CorruptionError, DAMAGED + r"\(CacheConfig.head_dim: expected an int >= 1, got 0\)", ("persist",)),
    ("an index unlike the files", damaged(edit_index(lambda i: i["config"].update(head_dim=D + 1))), {},
     kvcache.CorruptionError, f"written with head_dim={D}, but the index says head_dim={D + 1}", ("persist",)),
    ("an index that is a list", damaged(edit_index(lambda i: [i])), {},
     kvcache.CorruptionError, DAMAGED + r"\(bad magic\)", ("persist",)),
    ("a cold file missing", damaged(lambda d: (d / "layer0001.values").unlink()), {},
     kvcache.ColdStoreError, "cannot open a cold file: No such file", ("persist",)),
    ("a cold file of another layer", damaged(lambda d: (d / "layer0001.keys").write_bytes(
        (d / "layer0000.keys").read_bytes())), {},
     kvcache.CorruptionError, "holds keys of layer 0, expected keys of layer 1", ("persist",)),
    ("None", lambda ctx: [None], {}, TypeError, "TieredKVCache.open: cold_dir expected a path, got NoneType", ONE),
    ("int", lambda ctx: [3], {}, TypeError, "TieredKVCache.open: cold_dir expected a path, got int", ONE),
    ("head_dim override", lambda ctx: [persisted_copy(ctx)], dict(head_dim=8), ValueError,
     f"holds head_dim={D}, got head_dim=8", ("persist",)),
    ("n_layers override", lambda ctx: [persisted_copy(ctx)], dict(n_layers=L + 1), ValueError,
     f"holds n_layers={L}, got n_layers={L + 1}", ("persist",)),
    ("block_tokens override", lambda ctx: [persisted_copy(ctx)], dict(block_tokens=4), ValueError,
     "holds block_tokens=2, got block_tokens=4", ("persist",)),
    ("dtype override", lambda ctx: [persisted_copy(ctx)], dict(dtype="float16"), ValueError,
     "holds float32 cold files, got dtype/cold_dtype asking for float16", ("persist",)),
    ("unknown override", lambda ctx: [persisted_copy(ctx)], dict(colour="red"), TypeError,
     r"TieredKVCache.open: unknown config fields \['colour'\]", ("persist",)),
    ("max_seq_len below what is stored", lambda ctx: [persisted_copy(ctx)], dict(max_seq_len=10), ValueError,
     "TieredKVCache.open: max_seq_len=10 is below the 12 positions stored", ("persist",)),
    ("invalid hot_tokens", lambda ctx: [persisted_copy(ctx)], dict(hot_tokens=5), ValueError,
     "CacheConfig.hot_tokens: expected a multiple of block_tokens=2, got 5", ("persist",)),
    ("persist=False", lambda ctx: [persisted_copy(ctx)], dict(persist=False), ValueError,
     "TieredKVCache.open: a reopened cache always persists, got persist=False", ("persist",)),
    ("cold_dir override", lambda ctx: [persisted_copy(ctx)], dict(cold_dir="/elsewhere"), TypeError,
     "open\\(\\) got multiple values for keyword argument 'cold_dir'", ("persist",)),
]

OTHER_CPU = "avx2" if platform.machine() in ("aarch64", "arm64") else "neon"
SIMD = [  # kvcache.set_simd_backend(name)
    ("unknown", "bogus", ValueError, "unknown SIMD backend 'bogus': expected one of 'auto', 'scalar'"),
    ("upper case", "AVX2", ValueError, "unknown SIMD backend 'AVX2'"),
    ("empty", "", ValueError, "unknown SIMD backend '': expected one of"),
    ("NUL inside", "scalar\0avx2", ValueError, r"unknown SIMD backend 'scalar\\x00avx2'"),
    ("another CPU's", OTHER_CPU, ValueError, f"SIMD backend '{OTHER_CPU}' is not available on this CPU/build"),
    ("None", None, TypeError, "set_simd_backend: name expected a str, got NoneType"),
    ("bytes", b"scalar", TypeError, "set_simd_backend: name expected a str, got bytes"),
    ("int", 0, TypeError, "set_simd_backend: name expected a str, got int"),
]


CATALOGUE = (
    store_cases("store", lambda ctx: ctx.tok(), ("tiered",))
    + store_cases("store_batch", lambda ctx: ctx.tok(), ("f16",))
    + store_cases("store_layers", lambda ctx: ctx.layers(), ("persist",))
    + [Case(f"{method} layer {name}", lambda ctx, f=f, v=value: f(ctx.cache, v, ctx), exc, match, ("int8-tiered",))
       for method, f in LAYER_CALLS.items() for name, value, exc, match in BAD_LAYERS]
    + [Case(*row, flavours=("ram", "bf16-tiered")) for row in PAIRS]
    + [Case(*row) for row in CAPACITY]
    + cases("get positions", [(n, lambda ctx, v=v: v, e, m) for n, v, e, m in POSITIONS],
            lambda ctx, ab: ctx.cache.get(1, *ab), ("ram", "int8-tiered"))
    + cases("get out", OUTS, lambda ctx, out: ctx.cache.get(0, out=out), ("tiered", "f16-int8"))
    + [Case(f"get {name}", lambda ctx, kw=kw: ctx.cache.get(0, **kw(ctx)), exc, match, fl)
       for name, kw, exc, match, fl in GET_FLAGS]
    + cases("update_scores", ATTN, lambda ctx, a: ctx.cache.update_scores(1, a), ("tiered",))
    + cases("truncate", TRUNCATE, lambda ctx, n: ctx.cache.truncate(n), ("ram", "persist"))
    + cases("threads =", THREADS, lambda ctx, n: setattr(ctx.cache, "threads", n), ("ram",))
    + [Case("flush without persist", lambda ctx: ctx.cache.flush(), ValueError,
            "flush: this cache was created with persist=False; nothing is kept", ALL[:-1])]
    + [Case(f"closed {name}", closed_call(call), kvcache.CacheClosedError, "this TieredKVCache is closed",
            ("ram", "persist")) for name, call in CLOSED.items()]
    + cases("TieredKVCache", CONFIG, lambda ctx, kw: kvcache.TieredKVCache(**{**BASE, **kw}), ONE)
    + [Case("TieredKVCache config and keywords", lambda ctx: kvcache.TieredKVCache(ctx.cache.config, n_layers=2),
            TypeError, "TieredKVCache: pass either a CacheConfig or its keywords, not both", ONE),
       Case("TieredKVCache a dict", lambda ctx: kvcache.TieredKVCache(BASE), TypeError,
            "TieredKVCache: expected a CacheConfig, got dict", ONE)]
    + [Case(f"TieredKVCache cold_dir {name}", lambda ctx, m=make: kvcache.TieredKVCache(**BASE, cold_dir=m(ctx)),
            exc, match, fl) for name, make, exc, match, fl in COLD_DIRS]
    + [Case(f"open {name}", lambda ctx, a=args, kw=kw: kvcache.TieredKVCache.open(*a(ctx), **kw), exc, match, fl)
       for name, args, kw, exc, match, fl in OPEN]
    + cases("set_simd_backend", SIMD, lambda ctx, name: kvcache.set_simd_backend(name), ONE)
)


def param(case, flavour):
    return pytest.param(case, flavour, id=f"{case.name} [{flavour}]")


def run_case(case, flavour, tmp_path, make=Ctx):
    ctx = make(flavour, tmp_path)
    try:
        before = snapshot(ctx)
        with pytest.raises(case.exc, match=case.match) as info:
            case.call(ctx)
        assert type(info.value) is case.exc, f"expected exactly {case.exc}, got {type(info.value)}"
        assert_unchanged(before, snapshot(ctx))
        for a in ctx.sentinels:
            assert (a == 7).all(), "a failed get wrote into out"
        if case.after is not None:
            case.after(ctx)
    finally:
        ctx.close()


def fast_tmp_root():
    """tmpfs when there is one: the persisted flavour fsyncs at every flush."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture
def fast_tmp():
    path = tempfile.mkdtemp(prefix="kvcache-test-", dir=fast_tmp_root())
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def warm_up():
    """Pay first-use costs once in the fork server, not in each child (tests/isolate.py)."""
    with tempfile.TemporaryDirectory(dir=fast_tmp_root()) as tmp:
        for flavour in FLAVOURS:
            ctx = Ctx(flavour, pathlib.Path(tmp) / flavour)
            snapshot(ctx)
            with pytest.raises(TypeError, match="float64"):
                ctx.cache.store(0, ctx.tok().astype(np.float64), ctx.tok())
            ctx.close()
            if ctx.cold_dir is not None and ctx.cache.config.persist:
                kvcache.TieredKVCache.open(ctx.cold_dir).close()
        check_specials("f16-int8", tmp, "float16")


BY_NAME = {case.name: case for case in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "case names must be unique"


def run_named(name, flavour, tmp):
    run_case(BY_NAME[name], flavour, pathlib.Path(tmp))


@pytest.mark.parametrize("case,flavour", [param(c, f) for c in CATALOGUE for f in c.flavours])
def test_bad_input(case, flavour, fast_tmp):
    if case.local:
        isolated(lambda: run_case(case, flavour, fast_tmp))
    else:
        isolated_call(__name__, "run_named", case.name, flavour, str(fast_tmp))


# -- transformers: TieredCache / TieredLayer ------------------------------------------------

class TCtx(Ctx):
    """A TieredCache of one flavour: every layer but the last updated with a 13-token prompt."""

    def __init__(self, flavour, tmp_path):
        from kvcache.integrations.transformers import TieredCache  # imported once, by the parent
        self.model_config = types.SimpleNamespace(num_hidden_layers=L, num_attention_heads=2 * H,
                                                  num_key_value_heads=H, head_dim=D)
        opts = dict(FLAVOURS[flavour])
        self.flavour, self.tmp, self.sentinels = flavour, tmp_path, []
        self.cold_dir = tmp_path / opts.pop("cold") if "cold" in opts else None
        self.tc = TieredCache(config=self.model_config, max_seq_len=MAX, cold_dir=self.cold_dir, **opts)
        self.cache = self.tc.kv
        for l in range(L - 1):
            self.tc.update(self.states(13), self.states(13), l)

    def states(self, t=1, dtype=None, shape=None):
        """[1, H, t, D] float32 states, as a model's attention makes them."""
        return torch.from_numpy(rows(t, seed=50 + t)).permute(1, 0, 2).unsqueeze(0).to(dtype or torch.float32) \
            if shape is None else torch.randn(shape, dtype=dtype or torch.float32)

    def state(self):
        return {f"TieredLayer {l}": (layer.is_initialized, getattr(layer, "dtype", None))
                for l, layer in enumerate(self.tc.layers)}


def fresh_layer_takes_float32(ctx):
    """After a refused first update, the fresh layer still takes (and returns) float32."""
    k = ctx.states(2)
    keys, values = ctx.tc.update(k, k, L - 1)
    want = roundtrip(k[0].transpose(0, 1).numpy(), ctx.cache.config.dtype)
    assert keys.dtype == torch.float32 and as_bytes(keys[0].transpose(0, 1).numpy()) == as_bytes(want)


def update(layer=0, **kw):
    """A call updating ``layer`` with states ``kw`` (keys=..., values=...: make(ctx))."""
    def call(ctx):
        k = kw.get("keys", lambda ctx: ctx.states(2))(ctx)
        v = kw.get("values", lambda ctx: k)(ctx)
        return ctx.tc.update(k, v, layer)
    return call


SHAPED = r"TieredCache: {} expected shape \[1, 2, T, 5\], got "
TRANSFORMERS = [  # (name, call(ctx), exc, match)
    ("float64", update(keys=lambda ctx: ctx.states(2, torch.float64)), TypeError,
     "TieredCache: key_states expected dtype float32, float16 or bfloat16, got torch.float64"),
    ("int32 values", update(values=lambda ctx: ctx.states(2).int()), TypeError,
     "TieredCache: value_states expected dtype float32, float16 or bfloat16, got torch.int32"),
    ("float16 after float32", update(keys=lambda ctx: ctx.states(2, torch.float16)), TypeError,
     "TieredCache: key_states expected torch.float32 like the earlier updates of layer 0, got torch.float16"),
    ("values float16", update(values=lambda ctx: ctx.states(2, torch.float16)), ValueError,
     r"value_states expected \[1, 2, 2, 5\] torch.float32 like key_states, got \[1, 2, 2, 5\] torch.float16"),
    ("values 3 tokens", update(values=lambda ctx: ctx.states(3)), ValueError,
     r"value_states expected \[1, 2, 2, 5\] torch.float32 like key_states, got \[1, 2, 3, 5\]"),
    ("rank 3", update(keys=lambda ctx: ctx.states(2)[0]), ValueError, SHAPED.format("key_states") + r"\[2, 2, 5\]"),
    ("0-d", update(keys=lambda ctx: torch.tensor(1.0)), ValueError, SHAPED.format("key_states") + r"\[\]"),
    ("heads", update(keys=lambda ctx: ctx.states(shape=(1, 3, 2, D))), ValueError,
     SHAPED.format("key_states") + r"\[1, 3, 2, 5\]"),
    ("head_dim", update(values=lambda ctx: ctx.states(shape=(1, H, 2, 4))), ValueError,
     SHAPED.format("value_states") + r"\[1, 2, 2, 4\]"),
    ("batch 2", update(keys=lambda ctx: ctx.states(shape=(2, H, 2, D))), ValueError,
     "TieredCache: expected batch size 1, got 2"),
    ("batch 0", update(keys=lambda ctx: ctx.states(shape=(0, H, 2, D))), ValueError,
     "TieredCache: expected batch size 1, got 0"),
    ("no tokens", update(keys=lambda ctx: ctx.states(shape=(1, H, 0, D))), ValueError,
     "keys: expected at least one token, got 0"),
    ("meta device", update(keys=lambda ctx: torch.empty(1, H, 2, D, device="meta")), ValueError,
     "TieredCache: expected CPU tensors, got meta"),
    ("list", update(keys=lambda ctx: [[1.0]]), TypeError, "TieredCache: key_states expected a torch.Tensor, got list"),
    ("None values", update(values=lambda ctx: None), TypeError,
     "TieredCache: value_states expected a torch.Tensor, got NoneType"),
    ("numpy", update(keys=lambda ctx: ctx.states(2).numpy()), TypeError,
     "TieredCache: key_states expected a torch.Tensor, got ndarray"),
    ("past max_seq_len", update(keys=lambda ctx: ctx.states(MAX - 12)), kvcache.CacheFullError,
     "layer 0 holds 13 positions; 12 more would exceed max_seq_len=24"),
    ("layer_idx -1", update(layer=-1), IndexError, rf"TieredCache: layer_idx expected 0 <= layer_idx < {L}, got -1"),
    ("layer_idx n_layers", update(layer=L), IndexError, rf"layer_idx expected 0 <= layer_idx < {L}, got {L}"),
    ("layer_idx float", update(layer=0.0), TypeError, "TieredCache: layer_idx expected an int, got float"),
    ("crop None", lambda ctx: ctx.tc.crop(None), TypeError, "TieredCache.crop: max_length expected an int, got NoneType"),
    ("crop float", lambda ctx: ctx.tc.crop(-1.0), TypeError, "TieredCache.crop: max_length expected an int, got float"),
    ("reorder_cache", lambda ctx: ctx.tc.reorder_cache(torch.tensor([1])), ValueError,
     r"TieredCache.reorder_cache: batch size 1 only, got indices \[1\]"),
    ("batch_repeat_interleave", lambda ctx: ctx.tc.batch_repeat_interleave(2), ValueError,
     "TieredCache: batch size 1 only, got a repeat of 2"),
    ("TieredCache max_seq_len 0", lambda ctx: type(ctx.tc)(config=ctx.model_config, max_seq_len=0), ValueError,
     "CacheConfig.max_seq_len: expected an int >= 1, got 0"),
]
TRANSFORMERS_FIRST = [  # refused first updates of the fresh last layer: it must stay fresh
    ("float64 first", update(L - 1, keys=lambda ctx: ctx.states(2, torch.float64),
                             values=lambda ctx: ctx.states(2, torch.float64)), TypeError,
     "TieredCache: key_states expected dtype float32, float16 or bfloat16, got torch.float64"),
    ("no tokens first", update(L - 1, keys=lambda ctx: ctx.states(shape=(1, H, 0, D))), ValueError,
     "keys: expected at least one token, got 0"),
]


def transformers_cases():
    if torch is None:
        return []
    out = [Case(f"TieredCache {name}", call, exc, match, ("ram", "tiered", "f16"))
           for name, call, exc, match in TRANSFORMERS]
    return out + [Case(f"TieredCache {name}", call, exc, match, ("ram", "bf16-tiered"), fresh_layer_takes_float32)
                  for name, call, exc, match in TRANSFORMERS_FIRST]  # run in a fork of this process


@pytest.mark.parametrize("case,flavour", [param(c, f) for c in transformers_cases() for f in c.flavours] or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="could not import 'torch' (or transformers): "
                                                    "the TieredCache cases need both"))])
def test_transformers_bad_input(case, flavour, fast_tmp):
    isolated(lambda: run_case(case, flavour, fast_tmp, make=TCtx))


# -- NaN and inf are data -------------------------------------------------------------------

SPECIAL_F32 = np.array([0x7FC12345, 0x7F800001, 0xFFA00000, 0x7F800000, 0xFF800000,  # qNaN, sNaN, -sNaN, +-inf
                        0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x00800000],   # -0, denormals, max, min normal
                       np.uint32).view(np.float32).reshape(H, D)
SPECIAL_F16 = np.array([0x7E01, 0x7C01, 0xFD00, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0x0400],
                       np.uint16).view(np.float16).reshape(H, D)


SPECIALS = {"float32": SPECIAL_F32, "float16": SPECIAL_F16}


def special_tokens(n, base):
    """n tokens, each a rotation of the special values; every other one with the signs flipped."""
    unsigned = {2: np.uint16, 4: np.uint32}[base.itemsize]
    sign = unsigned(1 << (8 * base.itemsize - 1))
    bits = np.stack([np.roll(base.ravel().view(unsigned), t) ^ (sign if t % 2 else 0) for t in range(n)])
    return bits.view(base.dtype).reshape(n, H, D)


def check_specials(flavour, tmp, given):
    base, tmp_path = SPECIALS[given], pathlib.Path(tmp)
    opts = dict(FLAVOURS[flavour])
    cold = tmp_path / opts.pop("cold") if "cold" in opts else None
    c = kvcache.TieredKVCache(max_seq_len=MAX, cold_dir=cold, **opts, **SHAPE)
    k, v = special_tokens(MAX, base), special_tokens(MAX, base)[::-1].copy()
    c.store(0, k[0], v[0])
    c.store_batch(0, k[1:4], v[1:4])
    c.store_layers(np.stack([k[4:]] * L), np.stack([v[4:]] * L))  # layers 0 and 1: most blocks go cold
    c.store_batch(1, k[:4], v[:4])
    cfg = c.config
    if cfg.dtype == cfg.cold_format == "float32" and base.dtype == np.float32:
        want = lambda l, x: x  # noqa: E731  bit-exact: NaN payloads, signalling NaNs, -0.0, denormals
    else:  # the documented conversions (numpy's float16, ml_dtypes' bfloat16, int8 groups), per tier
        def want(l, x):
            hot = c._hot_tier()._debug_hot_blocks(l)
            wide = f16_to_f32 if x.dtype == np.float16 else lambda a: a.astype(np.float32)  # noqa: E731
            return np.stack([roundtrip(wide(x[p]), cfg.dtype,
                                       None if p // cfg.block_tokens in hot else cfg.cold_dtype)
                             for p in range(len(x))])
    layers = {0: (k, v), 1: (np.concatenate([k[4:], k[:4]]), np.concatenate([v[4:], v[:4]]))}
    for l, kv in layers.items():
        expected = as_bytes(tuple(want(l, x) for x in kv))
        assert as_bytes(c.get(l)) == expected, f"layer {l} of {flavour}"
    if cfg.dtype == "int8":  # a (token, head) group holding inf or NaN reads back as NaN, whole
        gk = c.get(0)[0]
        bad = ~np.isfinite(k.astype(np.float32)).all(axis=-1)
        assert bad.any() and np.isnan(gk[bad]).all() and not np.isnan(gk[~bad]).any()
    if cfg.persist:
        c.close()
        c = kvcache.TieredKVCache.open(cold)
        assert as_bytes(c.get(0)) == as_bytes(tuple(want(0, x) for x in layers[0]))
    c.close()


@pytest.mark.parametrize("given", ["float32", "float16"])
@pytest.mark.parametrize("flavour", ALL)
def test_specials_are_data(flavour, given, fast_tmp):
    isolated_call(__name__, "check_specials", flavour, str(fast_tmp), given)


# -- an input viewing the cache's own memory ------------------------------------------------

def store_from_own_views(flavour, tmp, method):
    """Store rows 100..399 of a layer back at 101..: the input views (get(copy=False)) the
    very rows the store writes, one position ahead; it must store what they held at the call."""
    opts = dict(FLAVOURS[flavour], hot_tokens=64, block_tokens=16) if "hot_tokens" in FLAVOURS[flavour] \
        else dict(FLAVOURS[flavour])
    cold = pathlib.Path(tmp) / opts.pop("cold") if "cold" in opts else None
    c = kvcache.TieredKVCache(max_seq_len=512, cold_dir=cold, **opts, **SHAPE)
    c.store_layers(rows(400, layers=L, seed=1), rows(400, layers=L, seed=2))
    k, v = c.get(0, 100, 400, copy=False, raw=True)
    want = [a.copy() for a in c.get(0, 100, 400)]
    c.truncate(101)
    if method == "store_layers":  # every layer reads layer 0's rows (stride 0 on the layer axis)
        c.store_layers(np.broadcast_to(k, (L,) + k.shape), np.broadcast_to(v, (L,) + v.shape))
    else:
        getattr(c, method)(0, k, v)
    got = c.get(0, 101, 401)
    assert as_bytes(got) == as_bytes(tuple(want)), f"{int((got[0] != want[0]).any(axis=(1, 2)).sum())} rows differ"
    c.close()


@pytest.mark.parametrize("method", ["store", "store_batch", "store_layers"])
@pytest.mark.parametrize("flavour", ["ram", "f16", "tiered", "persist"])
def test_an_input_viewing_the_cache_is_read_before_it_is_overwritten(flavour, method, fast_tmp):
    isolated_call(__name__, "store_from_own_views", flavour, str(fast_tmp), method)
