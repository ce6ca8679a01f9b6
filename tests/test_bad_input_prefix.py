"""Bad-input catalogue of the prefix store (issue #13, item 7; the style of tests/test_bad_input.py).

Every case runs against a store holding known records (3 blocks of a 14-token
prompt, saved from a cache of known content) in one flavour: RAM only; RAM
writing through to a disk directory; HMAC records; a float16 tiered source
cache (records from cold blocks).  Two kinds of case:

* an exception: one entry point (``PrefixStore(...)``, ``for_cache``,
  ``save``, ``match``, ``load``, ``prefix_hashes``) with one malformed
  argument must raise exactly the documented exception, its message naming
  what was expected and what came, and afterwards the store (every counter,
  the records in RAM, every file under the test's directory with its mode
  and bytes) and every cache (lengths, contents) are as before;
* a record fault: a record damaged in RAM or on disk (rows, header, token
  ids, key, parent, padding, trailer, cut short, another model's or
  another shape's renamed, another secret's, a CRC32C record in an HMAC
  store and back, a symlink, a directory or a FIFO under its name) makes
  ``load`` stop before it: a miss counted in the stats and logged, the
  record removed unless only its MAC failed; the cache then holds exactly
  the blocks before it, and nothing else changed.

Each case runs in a forked child (tests/isolate.py): a crash fails that case only.
"""
import dataclasses
import errno
import functools
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import types
from typing import Callable, Optional, Tuple

import numpy as np
import pytest

import kvcache
from helpers import SHAPE, contents, fill, rows
from isolate import isolated, isolated_call
from kvcache import PrefixStore

L, H, D = SHAPE["n_layers"], SHAPE["n_kv_heads"], SHAPE["head_dim"]
BT = 4                                   # block_tokens
MAX = 32
MODEL = "org/tiny@rev1"
PROMPT = list(range(1000, 1014))         # 14 tokens: 3 full blocks, saved
N_BLOCKS = len(PROMPT) // BT
SECRET = b"s3cret"
FLAVOURS = {  # "disk": a disk_dir; "cache": the caches' options ("cold": a cold_dir each)
    "ram": dict(),
    "disk": dict(disk=True),
    "mac": dict(disk=True, secret=SECRET),
    "f16-tiered": dict(disk=True, cache=dict(dtype="float16", hot_tokens=8, cold=True)),
}
ALL = tuple(FLAVOURS)
ONE = ("disk",)                          # for checks made before the store is touched

try:
    if os.environ.get("KVCACHE_TEST_SERVER"):  # the fork server (tests/isolate.py) runs without torch
        raise ImportError
    import torch
except ImportError:
    torch = None


# -- the store under test ---------------------------------------------------------------------

class Ctx:
    """A store of one flavour holding the 3 blocks of PROMPT, saved from ``src``; ``dst`` is an
    empty cache of the same shape, ``part`` one holding 5 positions."""

    def __init__(self, flavour, tmp):
        opts = FLAVOURS[flavour]
        self.flavour, self.tmp, self.cleanups = flavour, tmp, []
        self.cache_opts = dict(opts.get("cache", {}))
        self.disk_dir = tmp / "store" if opts.get("disk") else None
        self.secret = opts.get("secret")
        self.src = self.new_cache("src")
        fill(self.src, len(PROMPT), seed=1)
        self.store = self.open_store()
        assert self.store.save(self.src, PROMPT) == N_BLOCKS
        self.dst = self.new_cache("dst")
        self.part = self.new_cache("part")
        fill(self.part, 5, seed=7)
        self.caches = {"src": self.src, "dst": self.dst, "part": self.part}

    def new_cache(self, name, **kw):
        opts = dict(self.cache_opts, **kw)
        if opts.pop("cold", False):
            opts["cold_dir"] = self.tmp / f"cold-{name}"  # snapshot() leaves cold files to the cache
        return kvcache.TieredKVCache(max_seq_len=MAX, block_tokens=BT, **{**SHAPE, **opts})

    def open_store(self, **kw):
        args = dict(disk_dir=self.disk_dir, secret=self.secret)
        args.update(kw)
        return PrefixStore.for_cache(self.src, MODEL, **args)

    @property
    def layout(self):
        return self.store.layout

    def keys(self):
        """PROMPT's block keys, as docs/format.md computes them."""
        return kvcache.prefix_hashes(PROMPT, model=MODEL, **SHAPE, block_tokens=BT, dtype=self.layout.dtype)

    def file(self, block):
        return self.disk_dir / (self.keys()[block].hex() + ".kvp")

    def close(self):
        for undo in reversed(self.cleanups):
            undo()
        self.store.close()
        for c in self.caches.values():
            c.close()


def entries(root):
    """Every entry under ``root`` but the caches' cold files: its type and mode, and its bytes
    (a regular file) or target (a symlink)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith("cold-")]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body = (open(p, "rb").read() if stat.S_ISREG(st.st_mode)
                    else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            out[os.path.relpath(p, root)] = (st.st_mode, body)
    return out


def snapshot(ctx):
    """Everything the store and the caches hold and show, byte-exact."""
    store = ctx.store
    s = {"stats": store.stats(), "closed": store.closed,
         "ram": {k: bytes(h.buf) for k, h in store._ram.records.items()},
         "files": entries(ctx.tmp)}
    for name, c in ctx.caches.items():
        if c.closed:
            s[f"{name} closed"] = True
            continue
        s[f"{name} lengths"] = [c.layer_len(l) for l in range(L)]
        s[f"{name} contents"] = contents(c)
        s[f"{name} tokens_stored"] = c.stats()["tokens_stored"]
    return s


def diff(want, got):
    """Names of what differs (a dict's keys one by one), for the failure message."""
    out = []
    for k in sorted(want.keys() | got.keys()):
        a, b = want.get(k), got.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}[{kk!r}]" for kk in sorted(a.keys() | b.keys(), key=str) if a.get(kk) != b.get(kk)]
        elif a != b:
            out.append(k)
    return out


def assert_unchanged(before, after):
    changed = diff(before, after)
    assert not changed, f"the failed call changed: {changed}"


# -- unwritable directories ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def ro_mount_error() -> Optional[str]:
    """None if a read-only bind mount can be made here (root ignores permission bits, so
    root's unwritable directory is one), else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    d = tempfile.mkdtemp(prefix="kvcache-ro-probe-")
    try:
        try:
            ro_mount(d)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"mount refused: {exc}"
        writable = os.access(d, os.W_OK)
        subprocess.run(["umount", d], check=True)
        return "a read-only bind mount stays writable" if writable else None
    finally:
        os.rmdir(d)


def ro_mount(path):
    path = os.fspath(path)
    subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        subprocess.run(["umount", path], check=True)
        raise


def unwritable(ctx, path):
    """Make ``path`` (a directory) unwritable until the case ends: mode 0500, or for root
    (whom modes do not bind) a read-only bind mount of it."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500)
        ctx.cleanups.append(lambda: path.chmod(stat.S_IMODE(mode)))
    else:
        ro_mount(path)
        ctx.cleanups.append(lambda: subprocess.run(["umount", os.fspath(path)], check=True))
    assert not os.access(path, os.W_OK)
    return path


def write_file(path, text="not a directory"):
    path.write_text(text)
    return path


def foreign_dir(ctx, names=("notes.txt", "model.bin")):
    d = ctx.tmp / "foreign"
    d.mkdir()
    for n in names:
        (d / n).write_text(n)
    return d


# -- the catalogue -------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    name: str
    call: Callable[[Ctx], object]
    exc: type
    match: str
    flavours: Tuple[str, ...] = ALL
    prepare: Optional[Callable[[Ctx], None]] = None  # before the "before" snapshot
    arg: Optional[Callable[[Ctx], object]] = None    # made before the snapshot too: call(ctx, arg(ctx))
    local: bool = False           # needs torch: runs in a fork of the test process
    unwritable: bool = False      # needs an unwritable directory (root: a read-only mount)


GOOD = dict(SHAPE, block_tokens=BT)
BIG = 1 << 70
CONSTRUCTOR = [  # PrefixStore(MODEL, **GOOD, **kwargs): (name, kwargs(ctx) or kwargs, exc, match)
    ("model None", dict(model=None), TypeError, "PrefixStore.model: expected a str, got NoneType"),
    ("model bytes", dict(model=b"org/tiny"), TypeError, "PrefixStore.model: expected a str, got bytes"),
    ("model empty", dict(model=""), ValueError,
     "PrefixStore.model: expected a non-empty name of the weights, got ''"),
    ("model int", dict(model=3), TypeError, "PrefixStore.model: expected a str, got int"),
    ("n_layers 0", dict(n_layers=0), ValueError, "PrefixStore.n_layers: expected an int >= 1, got 0"),
    ("n_layers -1", dict(n_layers=-1), ValueError, "PrefixStore.n_layers: expected an int >= 1, got -1"),
    ("n_layers 2.5", dict(n_layers=2.5), TypeError, "PrefixStore.n_layers: expected an int, got float"),
    ("n_layers np.float64", dict(n_layers=np.float64(3)), TypeError,
     "PrefixStore.n_layers: expected an int, got float64"),
    ("n_layers str", dict(n_layers="3"), TypeError, "PrefixStore.n_layers: expected an int, got str"),
    ("n_layers bool", dict(n_layers=True), TypeError, "PrefixStore.n_layers: expected an int, got bool"),
    ("n_layers None", dict(n_layers=None), TypeError, "PrefixStore.n_layers: expected an int, got NoneType"),
    ("n_layers 2**32", dict(n_layers=2**32), ValueError,
     r"PrefixStore.n_layers: expected an int < 2\*\*32 \(a uint32 of the record header\), got 4294967296"),
    ("n_kv_heads 0", dict(n_kv_heads=0), ValueError, "PrefixStore.n_kv_heads: expected an int >= 1, got 0"),
    ("n_kv_heads np.int64 2**32", dict(n_kv_heads=np.int64(2**32)), ValueError,
     r"PrefixStore.n_kv_heads: expected an int < 2\*\*32 .*got 4294967296"),
    ("head_dim 2**70", dict(head_dim=BIG), ValueError, rf"PrefixStore.head_dim: expected an int < 2\*\*32 .*got {BIG}"),
    ("head_dim None", dict(head_dim=None), TypeError, "PrefixStore.head_dim: expected an int, got NoneType"),
    ("rows of 2**32 bytes", dict(n_kv_heads=2**15, head_dim=2**15), ValueError,
     r"PrefixStore: expected rows of fewer than 2\*\*32 bytes .*got 4294967296 \(n_kv_heads=32768 x "
     r"head_dim=32768 in float32\)"),
    ("block_tokens 0", dict(block_tokens=0), ValueError, "PrefixStore.block_tokens: expected an int >= 1, got 0"),
    ("block_tokens 4.0", dict(block_tokens=4.0), TypeError, "PrefixStore.block_tokens: expected an int, got float"),
    ("dtype float64", dict(dtype="float64"), ValueError,
     r"PrefixStore.dtype: expected one of \('float32', 'float16', 'bfloat16', 'int8'\), got 'float64'"),
    ("dtype upper case", dict(dtype="FLOAT32"), ValueError, "PrefixStore.dtype: expected one of .*got 'FLOAT32'"),
    ("dtype np.float32", dict(dtype=np.float32), TypeError, "PrefixStore.dtype: expected a str, got type"),
    ("dtype None", dict(dtype=None), TypeError, "PrefixStore.dtype: expected a str, got NoneType"),
    ("ram_bytes -1", dict(ram_bytes=-1), ValueError, "PrefixStore.ram_bytes: expected an int >= 0, got -1"),
    ("ram_bytes 1.5", dict(ram_bytes=1.5), TypeError, "PrefixStore.ram_bytes: expected an int, got float"),
    ("ram_bytes None", dict(ram_bytes=None), TypeError, "PrefixStore.ram_bytes: expected an int, got NoneType"),
    ("ram_bytes str", dict(ram_bytes="1"), TypeError, "PrefixStore.ram_bytes: expected an int, got str"),
    ("ram_bytes bool", dict(ram_bytes=True), TypeError, "PrefixStore.ram_bytes: expected an int, got bool"),
    ("disk_bytes -1", dict(disk_bytes=-1), ValueError, "PrefixStore.disk_bytes: expected an int >= 0, got -1"),
    ("disk_bytes str", dict(disk_bytes="1"), TypeError, "PrefixStore.disk_bytes: expected an int or None, got str"),
    ("disk_bytes float", dict(disk_bytes=1e9), TypeError, "PrefixStore.disk_bytes: expected an int or None, got float"),
    ("salt str", dict(salt="tenant"), TypeError, "PrefixStore.salt: expected bytes, got str"),
    ("salt None", dict(salt=None), TypeError, "PrefixStore.salt: expected bytes, got NoneType"),
    ("secret str", dict(secret="s3cret"), TypeError, "PrefixStore.secret: expected non-empty bytes or None, got str"),
    ("secret int", dict(secret=3), TypeError, "PrefixStore.secret: expected non-empty bytes or None, got int"),
    ("secret empty", dict(secret=b""), ValueError, "PrefixStore.secret: expected non-empty bytes or None, got b''"),
    ("disk_dir int", dict(disk_dir=3), TypeError, "PrefixStore.disk_dir: expected a path or None, got int"),
    ("disk_dir bytes", dict(disk_dir=b"/tmp/store"), TypeError,
     "PrefixStore.disk_dir: expected a path or None, got bytes"),
    ("disk_dir empty", dict(disk_dir=""), ValueError, "PrefixStore.disk_dir: expected a path or None, got ''"),
    ("disk_dir a file", lambda ctx: dict(disk_dir=write_file(ctx.tmp / "f")), NotADirectoryError,
     "PrefixStore.disk_dir: expected a directory, got a file"),
    ("disk_dir under a file", lambda ctx: dict(disk_dir=write_file(ctx.tmp / "f") / "sub"), NotADirectoryError,
     r"PrefixStore.disk_dir: cannot create the directory \(Not a directory\)"),
    ("disk_dir under /proc", dict(disk_dir="/proc/kvcache-prefix"), FileNotFoundError,
     r"PrefixStore.disk_dir: cannot create the directory \(No such file or directory\)"),
    ("disk_dir full of foreign files", lambda ctx: dict(disk_dir=foreign_dir(ctx)), FileExistsError,
     r"PrefixStore.disk_dir: expected an empty directory or a prefix store's, got one holding 2 foreign "
     r"entries \(e.g. 'model.bin'\)"),
    ("disk_dir holding one hidden file", lambda ctx: dict(disk_dir=foreign_dir(ctx, (".hidden",))), FileExistsError,
     r"got one holding 1 foreign entries \(e.g. '.hidden'\)"),
    ("disk_dir holding only a temporary file", lambda ctx: dict(disk_dir=foreign_dir(ctx, (".tmp-1-2-3",))),
     FileExistsError, r"got one holding 1 foreign entries \(e.g. '.tmp-1-2-3'\)"),
    ("unknown keyword", dict(colour="red"), TypeError, "unexpected keyword argument 'colour'"),
]
UNWRITABLE = [  # (name, the directory unwritable() makes so, disk_dir, exc, match)
    ("disk_dir an unwritable empty dir", lambda ctx: ctx.tmp / "ro", lambda ctx: ctx.tmp / "ro", PermissionError,
     "PrefixStore.disk_dir: expected a directory this process can write, got one it cannot"),
    ("disk_dir an unwritable store's", lambda ctx: ctx.disk_dir, lambda ctx: ctx.disk_dir, PermissionError,
     "PrefixStore.disk_dir: expected a readable and writable directory"),
    ("disk_dir under an unwritable dir", lambda ctx: ctx.tmp / "ro", lambda ctx: ctx.tmp / "ro" / "store",
     PermissionError,
     r"PrefixStore.disk_dir: cannot create the directory \((Permission denied|Read-only file system)\)"),
]


def construct(ctx, kw):
    kw = dict(kw)
    return PrefixStore(kw.pop("model", MODEL), **{**GOOD, **kw})


def other_cache(**kw):
    """A cache of another shape or dtype (``kw``), RAM only; closed when the case's process exits."""
    args = dict(SHAPE, max_seq_len=MAX, block_tokens=BT)
    args.update(kw)
    return kvcache.TieredKVCache(**args)


def closed_cache():
    c = other_cache()
    c.close()
    return c


NOT_CACHES = [  # (name, make()): not a cache
    ("None", lambda: None), ("object", object), ("ndarray", lambda: np.zeros((L, 4, H, D), np.float32)),
    ("dict", lambda: {"kv": None}), ("a PrefixStore", lambda: PrefixStore(MODEL, **GOOD)),
    ("a .kv that is not a cache", lambda: types.SimpleNamespace(kv=object())),
]
OTHER_SHAPES = [  # (field, kwargs, the store's value as shown, the cache's)
    ("n_layers", dict(n_layers=L + 1), str(L), str(L + 1)),
    ("n_kv_heads", dict(n_kv_heads=H + 1), str(H), str(H + 1)),
    ("head_dim", dict(head_dim=D - 1), str(D), str(D - 1)),
    ("block_tokens", dict(block_tokens=2 * BT), str(BT), str(2 * BT)),
    ("dtype", dict(dtype="int8"), r"'\w+'", "'int8'"),
]


def cache_cases(op, call):
    """``call(ctx, cache)`` = save or load with a cache that is not the store's."""
    out = [Case(f"{op} cache {name}", lambda ctx, m=make: call(ctx, m()), TypeError,
                rf"PrefixStore.{op}: cache expected a TieredKVCache \(or a TieredCache\), got "
                + {"ndarray": "ndarray", "a PrefixStore": "PrefixStore", "a .kv that is not a cache": "SimpleNamespace",
                   "None": "NoneType"}.get(name, name), ("ram",)) for name, make in NOT_CACHES]
    out += [Case(f"{op} cache of another {field}", lambda ctx, kw=kw: call(ctx, other_cache(**kw)), ValueError,
                 rf"PrefixStore.{op}: the store holds {field}={mine}, the cache has {field}={theirs}",
                 ("disk", "f16-tiered")) for field, kw, mine, theirs in OTHER_SHAPES]
    out.append(Case(f"{op} a closed cache", lambda ctx: call(ctx, closed_cache()), kvcache.CacheClosedError,
                    "this TieredKVCache is closed", ONE))
    return out


TOKENS = [  # malformed token ids: (name, tokens, exc, match)
    ("floats", [1000.0, 1001.0], TypeError, r"tokens: expected int token ids, got float 1000.0 at index 0"),
    ("a float among ints", PROMPT[:5] + [3.5], TypeError, r"tokens: expected int token ids, got float 3.5 at index 5"),
    ("np.float64 in a list", [np.float64(1)], TypeError, "tokens: expected int token ids, got float64"),
    ("bools", [True, False], TypeError, "tokens: expected int token ids, got bool True at index 0"),
    ("np.bool_ in a list", [1, np.bool_(True)], TypeError,
     r"tokens: expected int token ids, got bool_? (np\.)?True_? at index 1"),
    ("strings", ["1000", "1001"], TypeError, "tokens: expected int token ids, got str '1000' at index 0"),
    ("None in a list", PROMPT[:3] + [None], TypeError, "tokens: expected int token ids, got NoneType None at index 3"),
    ("a str", "1000 1001", TypeError, "tokens: expected token ids as a list of ints, a numpy integer array or a "
                                      "torch tensor, got str"),
    ("bytes", bytes(range(8)), TypeError, "tokens: expected token ids as .* got bytes"),
    ("None", None, TypeError, "tokens: expected token ids as .* got NoneType"),
    ("an int", 1000, TypeError, "tokens: expected token ids as .* got int"),
    ("a dict", {0: 1000}, TypeError, "tokens: expected token ids as .* got dict"),
    ("a range", range(1000, 1014), TypeError, "tokens: expected token ids as .* got range"),
    ("negative", PROMPT[:4] + [-1], ValueError, r"tokens: expected token ids in \[0, 2\*\*32\), got -1"),
    ("2**32", [2**32], ValueError, r"tokens: expected token ids in \[0, 2\*\*32\), got 4294967296"),
    ("2**70", [1 << 70], ValueError, rf"tokens: expected token ids in \[0, 2\*\*32\), got {1 << 70}"),
    ("negative array", np.array([3, -2]), ValueError, r"tokens: expected token ids in \[0, 2\*\*32\), got -2"),
    ("2**32 in an int64 array", np.array([1, 2**32]), ValueError, r"got 4294967296"),
    ("uint64 max", np.array([2**64 - 1], np.uint64), ValueError, r"got 18446744073709551615"),
    ("float32 array", np.array(PROMPT, np.float32), TypeError,
     "tokens: expected an integer array of token ids, got dtype float32"),
    ("float64 array", np.array(PROMPT, float), TypeError, "got dtype float64"),
    ("bool array", np.ones(14, bool), TypeError, "tokens: expected an integer array of token ids, got dtype bool"),
    ("object array", np.array(PROMPT, object), TypeError, "got dtype object"),
    ("str array", np.array(["1000"]), TypeError, "got dtype <U4"),
    ("batch of 2", np.array([PROMPT, PROMPT]), ValueError,
     r"tokens: expected shape \[T\] or \[1, T\] \(batch size 1\), got \[2, 14\]"),
    ("batch of 0", np.zeros((0, 14), np.int64), ValueError, r"expected shape \[T\] or \[1, T\] .*got \[0, 14\]"),
    ("3-D", np.array([[PROMPT]]), ValueError, r"expected shape \[T\] or \[1, T\] .*got \[1, 1, 14\]"),
    ("[T, 1]", np.array(PROMPT)[:, None], ValueError, r"expected shape \[T\] or \[1, T\] .*got \[14, 1\]"),
    ("0-d", np.array(1000), ValueError, r"expected shape \[T\] or \[1, T\] .*got \[\]"),
]
TORCH_TOKENS = [] if torch is None else [  # (name, make(), exc, match): built in the child
    ("torch float", lambda: torch.tensor(PROMPT, dtype=torch.float32), TypeError,
     "tokens: expected an integer tensor of token ids, got torch.float32"),
    ("torch bool", lambda: torch.ones(14, dtype=torch.bool), TypeError,
     "tokens: expected an integer tensor of token ids, got torch.bool"),
    ("torch batch of 2", lambda: torch.tensor([PROMPT, PROMPT]), ValueError,
     r"tokens: expected shape \[T\] or \[1, T\] \(batch size 1\), got \[2, 14\]"),
    ("torch 3-D", lambda: torch.tensor([[PROMPT]]), ValueError, r"got \[1, 1, 14\]"),
    ("torch negative", lambda: torch.tensor([5, -1]), ValueError, r"expected token ids in \[0, 2\*\*32\), got -1"),
    ("torch meta", lambda: torch.empty(14, dtype=torch.long, device="meta"), TypeError,
     "tokens: expected a tensor of token ids it can copy to the CPU, got one on meta"),
]
TOKEN_CALLS = {  # entry point: (call(ctx, tokens), flavours, the TOKENS it takes, torch ones too)
    "save": (lambda ctx, t: ctx.store.save(ctx.src, t), ("f16-tiered",), None, False),
    "match": (lambda ctx, t: ctx.store.match(t), ("disk",), None, True),
    "load": (lambda ctx, t: ctx.store.load(ctx.dst, t), ("mac",), None, True),
    "prefix_hashes": (lambda ctx, t: kvcache.prefix_hashes(t, model=MODEL, **GOOD, dtype="float32"), ("ram",),
                      ("floats", "bools", "a str", "None", "negative", "2**32", "batch of 2", "3-D"), False),
}


def token_cases():
    out = []
    for op, (call, flavours, only, with_torch) in TOKEN_CALLS.items():
        out += [Case(f"{op} tokens {name}", lambda ctx, v=value, c=call: c(ctx, v), exc, match, flavours)
                for name, value, exc, match in TOKENS if only is None or name in only]
        out += [Case(f"{op} tokens {name}", lambda ctx, m=make, c=call: c(ctx, m()), exc, match, flavours, local=True)
                for name, make, exc, match in TORCH_TOKENS if with_torch]
    return out


def close_store(ctx):
    ctx.store.close()


CLOSED = {  # every method of a closed store
    "save": lambda ctx: ctx.store.save(ctx.src, PROMPT),
    "match": lambda ctx: ctx.store.match(PROMPT),
    "load": lambda ctx: ctx.store.load(ctx.dst, PROMPT),
    "with": lambda ctx: ctx.store.__enter__(),
}

PREFIX_HASHES = [  # prefix_hashes(PROMPT, **fields): (name, fields, exc, match)
    ("model None", dict(model=None), TypeError, "prefix_hashes: model expected a str, got NoneType"),
    ("n_layers 0", dict(n_layers=0), ValueError, "prefix_hashes: n_layers expected an int >= 1, got 0"),
    ("head_dim float", dict(head_dim=5.0), TypeError, "prefix_hashes: head_dim expected an int, got float"),
    ("dtype float64", dict(dtype="float64"), ValueError, "prefix_hashes: dtype expected one of .*got 'float64'"),
    ("salt str", dict(salt="x"), TypeError, "prefix_hashes: salt expected bytes, got str"),
    ("no dtype", dict(dtype=None), TypeError, "prefix_hashes: dtype expected a str, got NoneType"),
]


def hashes(kw):
    args = dict(GOOD, model=MODEL, dtype="float32")
    args.update(kw)
    return kvcache.prefix_hashes(PROMPT, **args)


CATALOGUE = (
    [Case(f"PrefixStore {name}", construct, exc, match, ONE, arg=kw if callable(kw) else lambda ctx, kw=kw: kw)
     for name, kw, exc, match in CONSTRUCTOR]
    + [Case(f"PrefixStore {name}", lambda ctx, p=path: construct(ctx, dict(disk_dir=p(ctx))), exc, match, ONE,
            prepare=lambda ctx, d=ro: unwritable(ctx, d(ctx)), unwritable=True)
       for name, ro, path, exc, match in UNWRITABLE]
    + [Case("PrefixStore positional shape", lambda ctx: PrefixStore(MODEL, L, H, D, BT), TypeError,
            "takes 2 positional arguments but 6 were given", ONE),
       Case("PrefixStore disk_dir a live cache's cold_dir", lambda ctx: construct(ctx, dict(
           disk_dir=ctx.tmp / "cold-src")), FileExistsError,
           "PrefixStore.disk_dir: expected an empty directory or a prefix store's, got one holding", ("f16-tiered",)),
       Case("for_cache not a cache", lambda ctx: PrefixStore.for_cache(object(), MODEL), TypeError,
            r"PrefixStore.for_cache: cache expected a TieredKVCache \(or a TieredCache\), got object", ONE),
       Case("for_cache ram_bytes -1", lambda ctx: PrefixStore.for_cache(ctx.src, MODEL, ram_bytes=-1), ValueError,
            "PrefixStore.ram_bytes: expected an int >= 0, got -1", ONE),
       Case("for_cache a shape keyword", lambda ctx: PrefixStore.for_cache(ctx.src, MODEL, n_layers=L), TypeError,
            "got multiple values for keyword argument 'n_layers'", ONE),
       Case("for_cache model None", lambda ctx: PrefixStore.for_cache(ctx.src, None), TypeError,
            "PrefixStore.model: expected a str, got NoneType", ONE),
       Case("for_cache disk_dir a file", lambda ctx, f: PrefixStore.for_cache(ctx.src, MODEL, disk_dir=f),
            NotADirectoryError, "PrefixStore.disk_dir: expected a directory, got a file", ONE,
            arg=lambda ctx: write_file(ctx.tmp / "f"))]
    + cache_cases("save", lambda ctx, c: ctx.store.save(c, PROMPT))
    + cache_cases("load", lambda ctx, c: ctx.store.load(c, PROMPT))
    + [Case("load into the source cache", lambda ctx: ctx.store.load(ctx.src, PROMPT), ValueError,
            "PrefixStore.load: expected an empty cache, got one holding 14 positions"),
       Case("load into a cache holding 5 positions", lambda ctx: ctx.store.load(ctx.part, PROMPT), ValueError,
            "PrefixStore.load: expected an empty cache, got one holding 5 positions"),
       Case("load into a cache with one layer not empty", lambda ctx: ctx.store.load(ctx.dst, PROMPT), ValueError,
            "PrefixStore.load: expected an empty cache, got one holding 2 positions",
            prepare=lambda ctx: ctx.dst.store(L - 1, rows(2, seed=5), rows(2, seed=6))),
       Case("load with bad tokens into a non-empty cache", lambda ctx: ctx.store.load(ctx.part, [1.5]), TypeError,
            "tokens: expected int token ids, got float 1.5 at index 0", ONE)]
    + token_cases()
    + [Case(f"closed store {name}", call, kvcache.CacheClosedError, "this PrefixStore is closed", ("ram", "mac"),
            prepare=close_store) for name, call in CLOSED.items()]
    + [Case(f"prefix_hashes {name}", lambda ctx, kw=kw: hashes(kw), exc, match, ("ram",))
       for name, kw, exc, match in PREFIX_HASHES]
)
BY_NAME = {case.name: case for case in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "case names must be unique"


def run_case(case, flavour, tmp):
    ctx = Ctx(flavour, pathlib.Path(tmp))
    try:
        if case.prepare is not None:
            case.prepare(ctx)
        args = () if case.arg is None else (case.arg(ctx),)
        before = snapshot(ctx)
        with pytest.raises(case.exc, match=case.match) as info:
            case.call(ctx, *args)
        assert type(info.value) is case.exc, f"expected exactly {case.exc}, got {type(info.value)}: {info.value}"
        assert_unchanged(before, snapshot(ctx))
    finally:
        ctx.close()


def run_named(name, flavour, tmp):
    run_case(BY_NAME[name], flavour, tmp)


def fast_tmp_root():
    """tmpfs when there is one: the disk tier fsyncs every record."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture
def fast_tmp():
    path = pathlib.Path(tempfile.mkdtemp(prefix="kvcache-test-", dir=fast_tmp_root()))
    yield path
    for dirpath, dirnames, _ in os.walk(path):  # a case killed before its cleanup left a mount
        for d in dirnames:
            if os.path.ismount(os.path.join(dirpath, d)):
                subprocess.run(["umount", "-l", os.path.join(dirpath, d)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def warm_up():
    """Pay first-use costs once in the fork server, not in each child (tests/isolate.py)."""
    with tempfile.TemporaryDirectory(dir=fast_tmp_root()) as tmp:
        for flavour in FLAVOURS:
            ctx = Ctx(flavour, pathlib.Path(tmp) / flavour)
            snapshot(ctx)
            assert ctx.store.load(ctx.dst, PROMPT) == N_BLOCKS * BT
            ctx.close()


def param(case, flavour):
    return pytest.param(case, flavour, id=f"{case.name} [{flavour}]")


@pytest.mark.parametrize("case,flavour", [param(c, f) for c in CATALOGUE for f in c.flavours])
def test_bad_input(case, flavour, fast_tmp):
    if case.unwritable and os.geteuid() == 0 and ro_mount_error():
        pytest.skip(f"running as root, whom mode 0500 does not stop, and no read-only bind mount can be "
                    f"made here ({ro_mount_error()}): no unwritable directory to test with")
    if case.local:
        isolated(lambda: run_case(case, flavour, fast_tmp))
    else:
        isolated_call(__name__, "run_named", case.name, flavour, str(fast_tmp))


# -- a disk tier refusing writes after the store opened it ----------------------------------------

def save_refused_by_disk(flavour, tmp):
    """save raises the OSError, naming the file; every new record is in RAM all the same,
    counted; nothing reached the directory; a load then gets the whole prefix."""
    ctx = Ctx(flavour, pathlib.Path(tmp))
    try:
        d = ctx.tmp / "refusing"
        store = ctx.open_store(disk_dir=d)
        ctx.cleanups.append(store.close)
        unwritable(ctx, d)
        before = snapshot(ctx)
        with pytest.raises(OSError) as info:
            store.save(ctx.src, PROMPT)
        assert info.value.errno in (errno.EACCES, errno.EROFS), info.value
        assert os.path.dirname(info.value.filename) == str(d), info.value
        assert_unchanged(before, snapshot(ctx))  # the other store, the caches, every file
        stats = store.stats()
        assert (stats["blocks_saved"], stats["records_ram"], stats["records_disk"]) == (N_BLOCKS, N_BLOCKS, 0)
        assert set(os.listdir(d)) - {".lock"} == {"KVCACHE-PREFIX"}  # no record, no temporary file left
        assert store.load(ctx.dst, PROMPT) == N_BLOCKS * BT
        assert contents(ctx.dst) == [tuple(a.tobytes() for a in ctx.src.get(l, 0, N_BLOCKS * BT)) for l in range(L)]
    finally:
        ctx.close()


@pytest.mark.parametrize("flavour", ["disk", "mac"])
def test_save_refused_by_the_disk_keeps_the_records_in_ram(flavour, fast_tmp):
    if os.geteuid() == 0 and ro_mount_error():
        pytest.skip(f"running as root, whom mode 0500 does not stop, and no read-only bind mount can be "
                    f"made here ({ro_mount_error()}): no unwritable directory to test with")
    isolated_call(__name__, "save_refused_by_disk", flavour, str(fast_tmp))


# -- record faults: a counted miss, the record removed (unless only its MAC fails) ---------------

def flip(offset):
    """In place: XOR one byte at ``offset(layout)`` (negative: from the end)."""
    def damage(buf, layout):
        i = offset(layout)
        buf[i] ^= 0x01
    return damage


@dataclasses.dataclass
class Fault:
    name: str
    check: str                     # the check the log names ("checksum", "size"... "HMAC"); None: a plain miss
    in_place: Optional[Callable] = None      # damage(buf, layout) of the record's bytes, RAM or disk
    on_disk: Optional[Callable] = None       # damage(ctx, path) of its file (disk only)
    blocks: Tuple[int, ...] = (1,)
    flavours: Tuple[str, ...] = ("disk", "mac", "f16-tiered")
    mac_check: Optional[str] = None          # what the check is with HMAC records, if not ``check``


def record_of(ctx, block, **store_kw):
    """The bytes another store (another model, shape or secret) writes for ``block`` of PROMPT."""
    cache_kw = store_kw.pop("cache", {})
    ctx.others = n = getattr(ctx, "others", 0) + 1
    src = ctx.new_cache(f"other-{n}", **cache_kw)
    fill(src, len(PROMPT), seed=3)
    d = ctx.tmp / f"other-{n}"
    model = store_kw.pop("model", MODEL)
    args = dict(disk_dir=d, secret=ctx.secret)
    args.update(store_kw)
    with PrefixStore.for_cache(src, model, **args) as other:
        assert other.save(src, PROMPT) == N_BLOCKS
        c = src.config
        keys = kvcache.prefix_hashes(PROMPT, model=model, n_layers=c.n_layers, n_kv_heads=c.n_kv_heads,
                                     head_dim=c.head_dim, block_tokens=c.block_tokens, dtype=c.dtype,
                                     salt=args.get("salt", b""))
        data = (d / (keys[block].hex() + ".kvp")).read_bytes()
    src.close()
    shutil.rmtree(d)
    return data


def replace_with(make):
    def damage(ctx, path, block):
        data = make(ctx, block)
        path.write_bytes(data)
    return damage


def resized(n):
    """A file cut (or padded with zeros) to ``n(its size)`` bytes."""
    def damage(ctx, path, block):
        data = path.read_bytes()
        size = n(len(data))
        path.write_bytes(data[:size] + b"\0" * max(0, size - len(data)))
    return damage


def to_symlink(ctx, path, block):
    target = ctx.tmp / "elsewhere.kvp"
    os.rename(path, target)
    path.symlink_to(target)


def to_dir(ctx, path, block):
    path.unlink()
    path.mkdir()


def to_fifo(ctx, path, block):
    path.unlink()
    os.mkfifo(path)


FAULTS = [
    Fault("a row byte", "checksum", flip(lambda lay: lay.header_bytes + 3), blocks=(0, 1, 2),
          flavours=("ram", "disk", "mac", "f16-tiered"), mac_check="HMAC"),
    Fault("the last value byte", "checksum", flip(lambda lay: lay.body_bytes - 1), mac_check="HMAC",
          flavours=("ram", "disk", "mac")),
    Fault("the trailer", "checksum", flip(lambda lay: lay.total - 1), mac_check="HMAC",
          flavours=("ram", "disk", "mac")),
    Fault("the magic", "header", flip(lambda lay: 0), flavours=("ram", "disk", "mac")),
    Fault("n_layers in the header", "header", flip(lambda lay: 16), flavours=("ram", "disk")),
    Fault("the dtype code", "header", flip(lambda lay: 36), flavours=("ram", "disk")),
    Fault("a reserved byte", "header", flip(lambda lay: 120), flavours=("ram", "disk", "mac")),
    Fault("the key", "key", flip(lambda lay: 48), blocks=(0, 2), flavours=("ram", "disk", "mac")),
    Fault("the parent", "parent", flip(lambda lay: 100), flavours=("ram", "disk", "mac")),
    Fault("a token id", "tokens", flip(lambda lay: 128 + 8), blocks=(0, 1), flavours=("ram", "disk", "mac")),
    Fault("the padding after the token ids", "header", flip(lambda lay: 128 + 4 * BT), flavours=("ram", "disk")),
    Fault("cut short by a byte", "size", on_disk=resized(lambda n: n - 1), blocks=(0, 1)),
    Fault("cut to its fixed header", "size", on_disk=resized(lambda n: 128)),
    Fault("empty", "size", on_disk=resized(lambda n: 0), flavours=("disk",)),
    Fault("a byte longer", "size", on_disk=resized(lambda n: n + 1), flavours=("disk", "mac")),
    Fault("another model's record under its name", "key",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, model="org/other@rev2")), blocks=(0, 1)),
    Fault("another salt's record under its name", "key",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, salt=b"tenant-2")), flavours=("disk",)),
    Fault("another shape's record under its name", "size",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, cache=dict(head_dim=D + 1))), flavours=("disk", "mac")),
    Fault("another secret's record", "HMAC",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, secret=b"another secret")), blocks=(0, 1),
          flavours=("mac",)),
    # Sealed the other way: another worker's secret setting, kept (docs/format.md §7.2)
    Fault("an HMAC record in a CRC32C store", "HMAC",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, secret=b"s")), flavours=("disk",)),
    Fault("a CRC32C record in an HMAC store", "HMAC",
          on_disk=replace_with(lambda ctx, b: record_of(ctx, b, secret=None)), flavours=("mac",)),
    Fault("a symlink to it", "size", on_disk=to_symlink, flavours=("disk",)),
    Fault("a directory under its name", None, on_disk=to_dir, flavours=("disk",)),
    Fault("a FIFO under its name", None, on_disk=to_fifo, flavours=("disk",)),
]
FAULTS_BY_NAME = {f.name: f for f in FAULTS}
assert len(FAULTS_BY_NAME) == len(FAULTS)


class Logged(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def run_fault(name, flavour, tier, block, tmp):
    fault = FAULTS_BY_NAME[name]
    ctx = Ctx(flavour, pathlib.Path(tmp))
    log, logger = Logged(), logging.getLogger("kvcache")
    logger.addHandler(log)
    try:
        keys, total = ctx.keys(), ctx.layout.total
        if tier == "disk":  # a new process's store: every record on disk, none in RAM
            ctx.store.close()
            ctx.store = ctx.open_store()
            victim = ctx.file(block)
            if fault.in_place is not None:
                data = np.frombuffer(bytearray(victim.read_bytes()), np.uint8)
                fault.in_place(data, ctx.layout)
                victim.write_bytes(data.tobytes())
            else:
                fault.on_disk(ctx, victim, block)
        else:
            fault.in_place(ctx.store._ram.records[keys[block]].buf, ctx.layout)  # memory gone bad under the store
        check = fault.mac_check if (ctx.secret and fault.mac_check) else fault.check
        counted = check is not None
        kept = check in (None, "HMAC")
        before = snapshot(ctx)

        got = ctx.store.load(ctx.dst, PROMPT)

        positions = block * BT
        assert got == positions
        for l in range(L):  # exactly the blocks before the bad one, byte for byte
            assert ctx.dst.layer_len(l) == positions
            want = ctx.src.get(l, 0, positions)
            assert [a.tobytes() for a in ctx.dst.get(l)] == [a.tobytes() for a in want]
        want = dict(before)
        stats = want["stats"] = dict(before["stats"])
        stats["lookups"] += 1
        stats["query_tokens"] += len(PROMPT)
        stats[f"hit_tokens_{tier}"] += positions
        if counted:
            stats["integrity_failures"] += 1
            stats[f"integrity_failures_{tier}"] += 1
            stats["mac_failures"] += check == "HMAC"
        ram = want["ram"] = dict(before["ram"])
        files = want["files"] = dict(before["files"])
        victim_name = os.path.relpath(ctx.file(block), ctx.tmp) if ctx.disk_dir else None
        if tier == "disk":
            for i in range(block):  # the good ones come back to RAM
                ram[keys[i]] = ctx.file(i).read_bytes()
            stats["promotions"] += block
            stats["records_ram"] += block
            stats["bytes_ram"] += block * total
            if not kept:  # the rest: the good records, counted again
                del files[victim_name]
                stats["records_disk"] = N_BLOCKS - 1
                stats["bytes_disk"] = (N_BLOCKS - 1) * total
        elif not kept:
            del ram[keys[block]]
            stats["records_ram"] -= 1
            stats["bytes_ram"] -= total
        want["dst lengths"] = [positions] * L
        want["dst contents"] = [tuple(a.tobytes() for a in ctx.src.get(l, 0, positions)) for l in range(L)]
        want["dst tokens_stored"] = L * positions  # summed over layers
        after = snapshot(ctx)
        assert not diff(want, after), f"load changed more (or less) than the miss: {diff(want, after)}"

        if counted:  # one error logged, naming the record and the check
            assert len(log.records) == 1, log.records
            where = str(ctx.file(block)) if tier == "disk" else f"RAM record {keys[block].hex()}"
            assert where in log.records[0] and f"(block {block})" in log.records[0], log.records
            assert (f"fails its {check}" if check == "HMAC" else f"fails its {check} check: a miss, removed") \
                in log.records[0], log.records
        else:
            assert log.records == []
        if not kept:  # gone: the next save puts it back (if no tier holds it) and the whole prefix loads again
            assert ctx.store.save(ctx.src, PROMPT) == (0 if tier == "ram" and ctx.disk_dir else 1)
            again = ctx.new_cache("again")
            ctx.caches["again"] = again
            assert ctx.store.load(again, PROMPT) == N_BLOCKS * BT
            assert contents(again) == [tuple(a.tobytes() for a in ctx.src.get(l, 0, N_BLOCKS * BT))
                                       for l in range(L)]
    finally:
        logger.removeHandler(log)
        ctx.close()


def fault_params():
    out = []
    for f in FAULTS:
        for flavour in f.flavours:
            tiers = ["disk"] if flavour != "ram" else []
            if f.in_place is not None and flavour in ("ram", "mac"):
                tiers.append("ram")
            for tier in tiers:
                for block in f.blocks:
                    out.append(pytest.param(f.name, flavour, tier, block,
                                            id=f"{f.name} [{flavour}, {tier}, block {block}]"))
    return out


@pytest.mark.parametrize("name,flavour,tier,block", fault_params())
def test_a_bad_record_is_a_counted_miss(name, flavour, tier, block, fast_tmp):
    isolated_call(__name__, "run_fault", name, flavour, tier, block, str(fast_tmp))
