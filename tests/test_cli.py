"""The kvcache command (kvcache.cli), each subcommand in a subprocess."""
import json
import os

import numpy as np
import pytest

import kvcache
from helpers import flip_bits, run_python
from kvcache._format import HEADER_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kvcache.__file__)))
# A tiny bench: every row, in well under a second.
TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--context", "64", "--rounds", "2"]


def run(*args, path_first=None):
    """``python -m kvcache ARGS`` importing this package: (returncode, stdout, stderr).

    ``path_first``: a directory searched for modules before everything else."""
    path = [str(path_first)] if path_first else []
    path += [ROOT, os.environ.get("PYTHONPATH", "")]
    p = run_python("-m", "kvcache", *args, ok=False, env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
                   cwd=ROOT, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


ROWS = ["copy limit (np.copyto)", "numpy cache, decode", "numpy cache, prefill T=64",
        "store, decode",
        "store_layers, prefill T=64", "store_layers, decode", "get, whole context",
        "spill, hot_tokens=16", "store_layers float32", "store_layers float16",
        "store_layers bfloat16", "store_layers int8"]


def test_import_kvcache_does_not_import_the_command():
    code = "import sys, kvcache; assert not {'kvcache.cli', 'tqdm', 'matplotlib'} & set(sys.modules)"
    run_python("-c", code, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_bench_prints_every_row_and_writes_json(tmp_path):
    rc, out, err = run("bench", "--quick", *TINY, "--json", tmp_path / "r.json",
                       "--cold-dir", tmp_path)
    assert rc == 0, err
    assert "2 layers x 2 KV heads x 16, context 64" in out
    for row in ROWS:
        assert row in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in results["rows"]] == ROWS
    for r in results["rows"]:
        assert r["tokens_per_s"] > 0 and r["gb_s"] > 0
    assert results["rows"][0]["fraction_of_limit"] == 1.0
    assert results["machine"]["simd_backend"] == kvcache.simd_backend()
    assert results["token_bytes"] == 2 * 2 * 2 * 16 * 4
    assert set(results["dtypes"]) == {"float32", "float16", "bfloat16", "int8"}
    assert os.listdir(tmp_path) == ["r.json"]  # the spill's cold files are gone


def test_bench_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rc, out, err = run("bench", *TINY, "--dtype", "float16", "--threads", "1",
                       "--plot", tmp_path / "b.png")
    assert rc == 0, err
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_the_run(tmp_path):
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    rc, out, err = run("bench", *TINY, "--plot", tmp_path / "b.png", path_first=tmp_path)
    assert rc == 1 and "needs matplotlib" in one_line(err)
    assert "copy limit" not in out and not (tmp_path / "b.png").exists()


def test_info():
    rc, out, err = run("info")
    assert rc == 0, err
    assert f"kvcache {kvcache.__version__}" in out
    assert f"SIMD backend: {kvcache.simd_backend()}" in out
    assert ", ".join(kvcache.available_backends()) in out
    assert f"threads: {kvcache.config.usable_cores()}" in out
    build = kvcache._simd.build_info()
    assert build["vector"] in kvcache._simd.BACKENDS and isinstance(build["debug"], bool)
    assert f"KVC_VECTOR={build['vector']}" in out


def make_persisted(d):
    rng = np.random.default_rng(0)
    with kvcache.TieredKVCache(n_layers=2, n_kv_heads=2, head_dim=4, max_seq_len=64,
                               hot_tokens=16, block_tokens=4, cold_dir=d, persist=True) as c:
        x = rng.standard_normal((2, 30, 2, 4), dtype=np.float32)
        c.store_layers(x, x)
        c.store(1, x[0, 0], x[0, 0])
    return sorted(os.listdir(d))


def test_inspect_reports_the_cache_and_changes_nothing(tmp_path):
    d = tmp_path / "c"
    files = make_persisted(d)
    before = {f: (d / f).read_bytes() for f in files}
    rc, out, err = run("inspect", d)
    assert rc == 0, err
    assert "n_layers=2, n_kv_heads=2, head_dim=4, max_seq_len=64, hot_tokens=16" in out
    assert "seq_len: 30 (longest layer 31)" in out
    assert "cold until" in out
    row_bytes = 2 * 4 * 4
    lines = {int(line.split()[0]): line.split() for line in out.splitlines()
             if line.split() and line.split()[0].isdigit()}
    for layer, length in ((0, 30), (1, 31)):
        size = 2 * (d / f"layer{layer:04d}.keys").stat().st_size
        assert lines[layer] == [str(layer), str(length), "8", f"{2 * length * row_bytes:,}",
                                f"{size:,}"]
    assert "verify" not in out
    assert sorted(os.listdir(d)) == files
    assert {f: (d / f).read_bytes() for f in files} == before
    with kvcache.TieredKVCache.open(d) as c:  # still a valid cache
        assert c.seq_len == 30


def test_inspect_verify_finds_a_flipped_byte(tmp_path):
    d = tmp_path / "c"
    make_persisted(d)
    rc, out, err = run("inspect", d, "--verify")
    assert rc == 0, err
    assert "verify: OK, 32 block checksums match" in out
    row_bytes = 2 * 4 * 4
    path = d / "layer0001.values"
    flip_bits(path, HEADER_SIZE + 5 * row_bytes + 3, 1)  # position 5: block 1
    rc, out, err = run("inspect", d, "--verify")
    assert rc == 1
    line = one_line(err)
    assert str(path) in line and "block 1" in line and "checksum mismatch" in line
    rc, out, err = run("inspect", d)  # without --verify only headers are checked
    assert rc == 0, err


def test_bad_flag_exits_2():
    rc, out, err = run("bench", "--no-such-flag")
    assert rc == 2
    assert "--no-such-flag" in one_line(err)
    rc, out, err = run("bench", "--context", "0")
    assert rc == 2 and "--context" in one_line(err)
    rc, out, err = run()
    assert rc == 2 and "required" in one_line(err)


def test_missing_or_foreign_directory_exits_1(tmp_path):
    rc, out, err = run("inspect", tmp_path / "nope")
    assert rc == 1 and out == ""
    assert "no such cache directory" in one_line(err) and "nope" in err
    rc, out, err = run("inspect", tmp_path)  # a directory without a cache
    assert rc == 1 and "not a persisted kvcache directory" in one_line(err)
    rc, out, err = run("bench", *TINY, "--cold-dir", tmp_path / "nope")
    assert rc == 1 and "no such directory" in one_line(err)


def test_corrupt_header_and_index_exit_1(tmp_path):
    d = tmp_path / "c"
    make_persisted(d)
    (d / "layer0000.keys").write_bytes(b"garbage")
    rc, out, err = run("inspect", d)
    assert rc == 1 and "layer0000.keys" in one_line(err) and "bad magic" in err
    index = (d / "index.json").read_bytes()
    (d / "index.json").write_bytes(index.replace(b'"length":30', b'"length":20', 1))
    rc, out, err = run("inspect", d)
    assert rc == 1 and "corrupt cache index" in one_line(err)
