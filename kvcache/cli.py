"""The ``kvcache`` command: ``bench``, ``info`` and ``inspect``.

Imported only by the entry points (``kvcache`` and ``python -m kvcache``), never by
``import kvcache``; tqdm and matplotlib are imported when a subcommand needs them.
Expected failures print one line on stderr and exit 1 (2 for usage errors).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile

import numpy as np

import kvcache
from kvcache._benchkit import CopyLimit, Interleaved, NumpyCache, Side, ratio, tokens_per_s
from kvcache.config import DTYPES, CacheConfig, usable_cores

PREFILL_T = 256  # tokens per store_layers call in the prefill rows
SWEEP_T = (1, 4, 16, 64, 256)


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# -- bench ----------------------------------------------------------------------------
def _block_tokens(hot):
    """A block size for a tiered cache of ``hot`` RAM positions (room for two blocks)."""
    block = math.gcd(hot, 256)
    while block > 1 and hot < 2 * block:
        block //= 2
    return block


class _Bench:
    """The command's rows: a `Side` each, whose step fills (or reads) a context."""

    def __init__(self, a):
        self.a = a
        self.L, self.H, self.D, self.C = a.layers, a.kv_heads, a.head_dim, a.context
        self.token_bytes = 2 * self.L * self.H * self.D * 4  # float32 keys + values, every layer
        self.T = min(PREFILL_T, self.C)  # tokens per prefill chunk
        self.chunks = self.C // self.T  # prefill chunks a step
        rng = np.random.default_rng(0)
        shape = (self.L, self.T, self.H, self.D)  # C-contiguous: the limit copies flat views
        self.k = rng.standard_normal(shape, dtype=np.float32)
        self.v = rng.standard_normal(shape, dtype=np.float32)
        self.k1, self.v1 = self.k[:, :1], self.v[:, :1]
        self.decode_tokens = min(self.C, a.decode_tokens)
        self.sweep = sorted({min(T, self.C) for T in SWEEP_T})
        self.caches = []
        self.cold_dir = None

    def cache(self, **kw):
        args = dict(n_layers=self.L, n_kv_heads=self.H, head_dim=self.D, max_seq_len=self.C,
                    threads=self.a.threads)
        args.update(kw)
        c = kvcache.TieredKVCache(**args)
        self.caches.append(c)
        return c

    def close(self):
        for c in self.caches:
            c.close()

    def prefill(self, cache):
        for _ in range(self.chunks):
            cache.store_layers(self.k, self.v)

    def filling(self, name, cache):
        """A row whose step prefills ``cache``'s context, emptied before (untimed)."""
        return Side(name, lambda: self.prefill(cache), self.chunks * self.T, enter=cache.reset)

    def rows(self):
        """The table's rows, the copy limit first; each step starts from an empty cache."""
        a, C, T, n = self.a, self.C, self.T, self.decode_tokens
        k, v = self.k, self.v
        k0, v0 = k[:, 0], v[:, 0]  # one token, every layer: [layers, H, D]
        limit = CopyLimit(self.L, self.H, self.D, C)
        npc = NumpyCache(self.L, self.H, self.D, C)

        def numpy_prefill():
            for _ in range(self.chunks):
                npc.store_batch(k, v, T)

        def numpy_decode():
            for _ in range(n):
                npc.store_one(k0, v0)

        main = self.cache(dtype=a.dtype)

        def store_decode():
            for _ in range(n):
                for layer in range(self.L):
                    main.store(layer, k0[layer], v0[layer])

        def store_layers_decode():
            for _ in range(n):
                main.store_layers(self.k1, self.v1)

        reader = self.cache(dtype=a.dtype)
        self.prefill(reader)
        outs = (np.empty((reader.seq_len, self.H, self.D), np.float32),
                np.empty((reader.seq_len, self.H, self.D), np.float32))

        def get():
            for layer in range(self.L):
                reader.get(layer, out=outs)

        hot = a.hot_tokens if a.hot_tokens else max(2, C // 4)
        cold_dir = tempfile.mkdtemp(prefix="kvcache-bench-", dir=a.cold_dir) if a.cold_dir else None
        spill = self.cache(dtype=a.dtype, hot_tokens=hot, block_tokens=_block_tokens(hot),
                           cold_dir=cold_dir)
        self.cold_dir = cold_dir  # the cache removes its files on close, bench the directory

        rows = [
            limit.side(k, v, repeat=self.chunks, name="copy limit (np.copyto)"),
            Side("numpy cache, decode", numpy_decode, n, enter=npc.reset),
            Side(f"numpy cache, prefill T={T}", numpy_prefill, self.chunks * T, enter=npc.reset),
            Side("store, decode", store_decode, n, enter=main.reset),
            self.filling(f"store_layers, prefill T={T}", main),
            Side("store_layers, decode", store_layers_decode, n, enter=main.reset),
            Side("get, whole context", get, reader.seq_len),
            self.filling(f"spill, hot_tokens={hot}", spill),
        ]
        for dt in DTYPES:
            rows.append(self.filling(f"store_layers {dt}",
                                     main if dt == a.dtype else self.cache(dtype=dt)))
        return rows

    def measure(self, rows, rounds, bar):
        """Median tokens/s of each row, the rows interleaved (B A | A B ...) in every round."""
        Interleaved(rows).run(rounds, progress=lambda: bar.update(1))
        return {s.name: tokens_per_s(s) for s in rows}

    def plot_rows(self):
        """The chart's batch-size sweep: store_batch of T tokens, layer after layer."""
        c = self.cache(dtype=self.a.dtype)
        rows = []
        for T in self.sweep:

            def batch(T=T):
                for _ in range(self.C // T):
                    for layer in range(self.L):
                        c.store_batch(layer, self.k[layer, :T], self.v[layer, :T])
            rows.append(Side(f"store_batch T={T}", batch, self.C // T * T, enter=c.reset))
        return rows


def _machine():
    return {"kvcache": kvcache.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "simd_backend": kvcache.simd_backend(),
            "available_backends": list(kvcache.available_backends()),
            "usable_cores": usable_cores(), **kvcache._simd.build_info()}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'kvcache[bench]'") from None
    return plt


def _plot(plt, path, results, shape):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    sweep = results["batch_sweep"]
    axes[0].plot([r["T"] for r in sweep], [r["gb_s"] for r in sweep], "o-", label="store_batch")
    axes[0].axhline(results["limit_gb_s"], color="gray", ls="--", label="copy limit")
    axes[0].set(xscale="log", xlabel="tokens per store_batch call", ylabel="GB/s",
                title="Batch size")
    simd = results["simd"]
    names = list(simd)
    x = np.arange(len(names))
    ops = list(next(iter(simd.values())))
    for i, op in enumerate(ops):
        axes[1].bar(x + i * 0.8 / len(ops), [simd[n][op] for n in names], 0.8 / len(ops), label=op)
    axes[1].set(xticks=x + 0.4 - 0.4 / len(ops), xticklabels=names, ylabel="GB/s",
                title="SIMD path")
    dt = results["dtypes"]
    axes[2].bar(list(dt), [dt[d] for d in dt])
    axes[2].set(ylabel="tokens/s", title="store_layers by dtype")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"kvcache {kvcache.__version__} bench: {shape}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench(a):
    from tqdm import tqdm  # type: ignore[import-untyped]

    if a.context < 4:
        raise CLIError(f"--context must be at least 4, got {a.context}")
    if a.cold_dir and not os.path.isdir(a.cold_dir):
        raise CLIError(f"--cold-dir {a.cold_dir}: no such directory")
    plt = _pyplot() if a.plot else None  # before the run: a missing matplotlib fails at once
    b = _Bench(a)
    shape = (f"{a.layers} layers x {a.kv_heads} KV heads x {a.head_dim}, context {a.context}, "
             f"{a.dtype}")
    print(f"kvcache {kvcache.__version__}: SIMD path {kvcache.simd_backend()}, "
          f"{a.threads or usable_cores()} threads")
    print(f"shape {shape}; a token = keys + values of every layer = "
          f"{b.token_bytes / 1024:g} KiB (float32)")
    try:
        rows = b.rows()
        plot_rows = b.plot_rows() if a.plot else []
        backends = [n for n in ("scalar", kvcache.simd_backend())
                    if n in kvcache.available_backends()] if a.plot else []
        backends = list(dict.fromkeys(backends))
        total = a.rounds * (len(rows) + len(plot_rows) + 2 * len(backends))
        with tqdm(total=total, desc="bench", unit="run", leave=False, file=sys.stderr) as bar:
            rates = b.measure(rows + plot_rows, a.rounds, bar)
            of_limit = {s.name: ratio(rows[0], s) for s in rows}  # before the SIMD rows re-run
            simd = {}
            if backends:
                active = kvcache.simd_backend()
                simd_rows = [r for r in rows if r.name.startswith(("store_layers, prefill", "get"))]
                try:
                    for name in backends:
                        kvcache.set_simd_backend(name)
                        r = b.measure(simd_rows, a.rounds, bar)
                        simd[name] = {k.split(",")[0]: v * b.token_bytes / 1e9 for k, v in r.items()}
                finally:
                    kvcache.set_simd_backend(active)
    finally:
        b.close()
        if b.cold_dir:
            os.rmdir(b.cold_dir)

    limit = rates[rows[0].name]
    print(f"{'':<30}{'tokens/s':>12}{'GB/s':>9}{'of limit':>10}")
    table = []
    for row in rows:
        name, r, frac = row.name, rates[row.name], of_limit[row.name]
        gbs = r * b.token_bytes / 1e9
        table.append({"name": name, "tokens_per_s": r, "gb_s": gbs, "fraction_of_limit": frac})
        print(f"{name:<30}{r:>12,.0f}{gbs:>9.2f}{frac:>9.2f}x")
    print("tokens/s: full-model tokens (every layer's keys and values); GB/s: their float32 "
          "bytes; limit: np.copyto of the same bytes into a preallocated buffer, same run")
    results = {"machine": _machine(), "shape": {"layers": a.layers, "kv_heads": a.kv_heads,
                                                "head_dim": a.head_dim, "context": a.context,
                                                "dtype": a.dtype, "threads": a.threads},
               "rounds": a.rounds, "token_bytes": b.token_bytes, "rows": table,
               "limit_gb_s": limit * b.token_bytes / 1e9,
               "dtypes": {dt: rates[f"store_layers {dt}"] for dt in DTYPES}}
    if a.plot:
        results["batch_sweep"] = [{"T": T, "gb_s": rates[f"store_batch T={T}"] * b.token_bytes / 1e9}
                                  for T in b.sweep]
        results["simd"] = simd
        _plot(plt, a.plot, results, shape)
        print(f"chart written to {a.plot}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {a.json}")
    return 0


# -- info -------------------------------------------------------------------------------
def info(a):
    build = kvcache._simd.build_info()
    print(f"kvcache {kvcache.__version__} ({os.path.dirname(kvcache.__file__)})")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"SIMD backend: {kvcache.simd_backend()} (available: "
          f"{', '.join(kvcache.available_backends())}; KVCACHE_SIMD="
          f"{os.environ.get('KVCACHE_SIMD', 'auto') or 'auto'})")
    print(f"threads: {usable_cores()} (usable cores)")
    print(f"build: KVC_VECTOR={build['vector']} (compile-time path), "
          f"{'debug (-O0, bounds checks)' if build['debug'] else 'optimized'}")
    return 0


# -- inspect ----------------------------------------------------------------------------
def _read_secret(path):
    """The bytes of ``--secret-file``, exactly (no newline stripped: the store's ``secret=``)."""
    with open(path, "rb") as f:
        secret = f.read()
    if not secret:
        raise CLIError(f"--secret-file {path}: empty (a store's secret is non-empty bytes)")
    return secret


def _prefix_entries(path):
    """(record files as (name, size), temporary files, other entries) of a store directory."""
    from kvcache.prefix import disk

    records, temps, others = [], 0, []
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if name in (disk.MARKER, disk.LOCK_NAME):
                continue
            if name.startswith(disk.TEMP_PREFIX):  # a write in progress (or a crash's leftover)
                temps += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # evicted by a process sharing the directory
                continue
            if disk.is_record_name(name) and entry.is_file(follow_symlinks=False):
                records.append((name, st.st_size))
            else:
                others.append(name)
    return sorted(records), temps, sorted(others)


def _record_group(path):
    """What a record's header says it holds: (shape, block_tokens, dtype, trailer), or None."""
    from kvcache.prefix import record as rec

    try:
        with open(path, "rb") as f:
            head = f.read(rec.FIXED)
    except FileNotFoundError:
        return None
    if len(head) < rec.FIXED:
        return None
    h = rec.parse_header(head)
    if h["magic"] != rec.MAGIC or h["version"] != rec.VERSION or not isinstance(h["dtype"], str):
        return None
    return (f"{h['n_layers']}x{h['n_kv_heads']}x{h['head_dim']}", h["block_tokens"], h["dtype"],
            "HMAC" if h["flags"] & rec.FLAG_HMAC else "CRC32C")


def inspect_prefix(a):
    """``inspect`` of a prefix store's directory: its records by shape, then ``--verify``."""
    from kvcache.prefix import disk
    from kvcache.prefix import record as rec

    path = a.dir
    secret = _read_secret(a.secret_file) if a.secret_file else None
    records, temps, others = _prefix_entries(path)
    groups = {}  # header's (shape, block_tokens, dtype, trailer), or None: [records, tokens, bytes]
    for name, size in records:
        g = _record_group(os.path.join(path, name))
        row = groups.setdefault(g, [0, 0, 0])
        row[0] += 1
        row[1] += g[1] if g else 0
        row[2] += size
    print(f"kvcache prefix store in {path}")
    print(f"records: {len(records)}, tokens: {sum(r[1] for r in groups.values())}, "
          f"bytes: {sum(size for _, size in records):,}")
    ignored = ([f"{temps} temporary file{'s' * (temps != 1)} (writes in progress)"] if temps else []) + \
        ([f"{len(others)} foreign entr{'ies' if len(others) != 1 else 'y'} ({', '.join(others)})"]
         if others else [])
    if ignored:
        print("ignored: " + "; ".join(ignored))
    print(f"{'shape (LxHxD)':>15}{'block':>7}{'dtype':>10}{'trailer':>9}{'records':>9}{'tokens':>9}"
          f"{'bytes':>14}")
    for g in sorted(groups, key=lambda g: (g is None, g or ())):
        n, tokens, size = groups[g]
        shape, block, dtype, trailer = g if g else ("unreadable", "-", "-", "-")
        print(f"{shape:>15}{block:>7}{dtype:>10}{trailer:>9}{n:>9}{tokens:>9}{size:>14,}")
    if not a.verify:
        return 0
    bad, good, unchecked = [], 0, 0
    for name, _ in records:
        file = os.path.join(path, name)
        try:
            why = rec.verify_file(file, secret, key=bytes.fromhex(name[:-len(disk.SUFFIX)]))
        except FileNotFoundError:  # evicted meanwhile by a process sharing the directory
            continue
        if why is None:
            good += 1
        elif why == rec.MAC_UNCHECKED:
            unchecked += 1
            print(f"verify: {file}: an HMAC record, its MAC not verified (no --secret-file)")
        else:
            bad.append(f"{file}: {why}")
    for line in bad:
        print(f"kvcache: corrupt: {line}", file=sys.stderr)
    if bad:
        return 1
    print(f"verify: OK, {good} records pass every check"
          + (f"; {unchecked} HMAC records pass all but the MAC check (no --secret-file)"
             if unchecked else ""))
    return 0


def inspect(a):
    from kvcache._format import index_config, read_index, verify_layer
    from kvcache.prefix.disk import is_store_dir

    path = a.dir
    if os.path.isdir(path) and is_store_dir(path):
        return inspect_prefix(a)
    if a.secret_file:
        raise CLIError(f"--secret-file: {path} is not a prefix store's directory (no "
                       f"KVCACHE-PREFIX marker); a cache's files carry no MAC")
    index = read_index(path)  # FileNotFoundError / CorruptionError: one line, exit 1
    try:
        stored = index["config"]
        config = index_config(index, path)
        layers = index["layers"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(f"{os.path.join(path, 'index.json')}: corrupt cache index ({exc})") from None
    rb = config.cold_row_bytes
    print(f"kvcache cache in {path}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in stored.items()))
    lengths = [entry["length"] for entry in layers]
    print(f"seq_len: {min(lengths, default=0)} (longest layer {max(lengths, default=0)})")
    print("hot tier: not recorded on disk; every position is cold until the cache is reopened")
    print(f"{'layer':>5}{'length':>9}{'blocks':>8}{'token bytes':>14}{'file bytes':>14}")
    bad, checked = [], 0
    for layer, entry in enumerate(layers):
        try:
            sizes, bad_blocks, n = verify_layer(path, config, layer, entry, a.verify)
        except FileNotFoundError as exc:
            raise CLIError(f"{exc.filename}: missing cold file") from None
        checked += n
        bad += [f"{name}: block {b} (positions {first}..{last}) checksum mismatch"
                for name, b, first, last in bad_blocks]
        print(f"{layer:>5}{entry['length']:>9}{len(entry['rows']):>8}"
              f"{2 * sum(entry['rows']) * rb:>14,}{sum(sizes):>14,}")
    if a.verify:
        for line in bad:
            print(f"kvcache: corrupt: {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"verify: OK, {checked} block checksums match")
    return 0


# -- entry point ------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error: one line on stderr, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser():
    p = _Parser(prog="kvcache", description="kvcache: a KV cache for LLM "
                                "inference on CPUs. Benchmark it, describe the build, "
                                "inspect a persisted cache or a prefix store.")
    p.add_argument("--version", action="version", version=f"kvcache {kvcache.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bench,info,inspect}")
    b = sub.add_parser("bench", help="store/get throughput beside this machine's copy limit")
    b.add_argument("--layers", type=int, default=32)
    b.add_argument("--kv-heads", type=int, default=8)
    b.add_argument("--head-dim", type=int, default=128)
    b.add_argument("--context", type=int, default=None,
                   help="tokens stored per round (default 1024, --quick 256)")
    b.add_argument("--hot-tokens", type=int, default=None,
                   help="RAM positions of the spill row's cache (default a quarter of the context)")
    b.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype of the store and get rows")
    b.add_argument("--threads", type=int, default=None, help="store_layers threads")
    b.add_argument("--cold-dir", default=None, help="where the spill row's cold files go")
    b.add_argument("--rounds", type=int, default=None, help="repetitions (default 7, --quick 5)")
    b.add_argument("--quick", action="store_true", help="a smaller context and fewer rounds")
    b.add_argument("--json", metavar="PATH", help="write the results (and machine info) as JSON")
    b.add_argument("--plot", metavar="PATH.png", help="write a chart (needs matplotlib)")
    b.set_defaults(func=bench)
    i = sub.add_parser("info", help="version, SIMD paths, threads, build flags")
    i.set_defaults(func=info)
    n = sub.add_parser("inspect", help="describe a persisted cache directory or a prefix "
                                       "store's (read-only)")
    n.add_argument("dir")
    n.add_argument("--verify", action="store_true",
                   help="recompute every block's CRC32C (a prefix store: check every record); "
                        "exit 1 on a mismatch")
    n.add_argument("--secret-file", metavar="PATH",
                   help="a prefix store's secret (the file's bytes, exactly): --verify then "
                        "checks the HMAC of HMAC records too")
    n.set_defaults(func=inspect)
    return p


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    if a.command == "bench":
        for name in ("layers", "kv_heads", "head_dim", "context", "hot_tokens", "threads",
                     "rounds"):
            value = getattr(a, name)
            if value is not None and value < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if a.context is None:
            a.context = 256 if a.quick else 1024
        if a.rounds is None:
            a.rounds = 5 if a.quick else 7
        a.decode_tokens = 64 if a.quick else 256
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("kvcache: interrupted", file=sys.stderr)
        return 130
    except (CLIError, OSError, ValueError, TypeError, kvcache.KVCacheError) as exc:
        if isinstance(exc, OSError) and exc.strerror:
            exc = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        print(f"kvcache {a.command}: {exc}", file=sys.stderr)
        return 1
