"""The prefix store's disk tier (issue #13, item 4), shown with real processes:
a writer killed mid-write, a new process finding every record, several
processes sharing one directory under one budget, permissions, the RAM tier off.

The children are in prefix_disk_worker.py; the KV each block must hold is a
function of its prompt there, so the parent checks every byte it loads.
"""
import json
import multiprocessing
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvcache
import prefix_disk_worker as w
from helpers import run_threads
from kvcache.prefix import disk as disk_mod
from kvcache.prefix.disk import DiskTier

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prefix_disk_worker.py")
B = w.B


def child_env():
    """The environment of a child: it imports the kvcache this process imported (the
    source tree's, or an installed or cross-built one)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(kvcache.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [here, env.get("PYTHONPATH", "")] if p)
    return env


def records(d):
    """{name: size} of the record files under ``d``."""
    out = {}
    with os.scandir(d) as it:
        for e in it:
            if e.name.endswith(".kvp"):
                try:
                    out[e.name] = e.stat().st_size
                except FileNotFoundError:  # evicted since the listing
                    pass
    return out


def temps(d, pid=None):
    prefix = disk_mod.TEMP_PREFIX + ("" if pid is None else f"{pid}-")
    return sorted(n for n in os.listdir(d) if n.startswith(prefix))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- a writer killed at random moments -------------------------------------------------
def check_after_crashes(d, seeds):
    """A fresh store on ``d`` loads exactly the complete records the killed
    writers (``seeds``) renamed in: every chain a prefix of its blocks, every
    byte the writer's, nothing else under a record's name, no integrity failure."""
    st = w.store(d)
    on_disk = set(records(d))
    accounted = 0
    for seed in seeds:
        r = 0
        while True:
            tokens = w.chain([seed, r], w.CHAIN_BLOCKS)
            present = [n in on_disk for n in w.key_names(tokens)]
            n = sum(present)
            assert present == [True] * n + [False] * (len(present) - n), (seed, r, present)
            assert w.load_exact(st, tokens) == n * B
            accounted += n
            if n < w.CHAIN_BLOCKS:  # the chain it was writing when it died
                break
            r += 1
    assert accounted == len(on_disk), "record files that no writer wrote"
    s = st.stats()
    assert s["integrity_failures"] == 0, s
    assert s["records_disk"] == len(on_disk) and s["bytes_disk"] == len(on_disk) * w.RECORD_BYTES
    return st


def test_killed_writer_leaves_only_complete_records(tmp_path):
    d = str(tmp_path / "store")
    rng = np.random.default_rng(13)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # Temporary files of live processes (this one, the sleeper): they must survive.
        live = [f"{disk_mod.TEMP_PREFIX}{pid}-1-0" for pid in (os.getpid(), sleeper.pid)]
        seeds = []
        for round_ in range(4):
            seed = 100 + round_
            p = subprocess.Popen([sys.executable, WORKER, "kill-writer", d, str(seed)],
                                 stdout=subprocess.PIPE, text=True, env=child_env())
            try:
                assert select.select([p.stdout], [], [], 60)[0], "the writer never started"
                assert p.stdout.readline().strip() == "ready"
                if round_ == 0:
                    for name in live:
                        open(os.path.join(d, name), "wb").close()
                time.sleep(rng.uniform(0.02, 0.2))
                if round_ % 2:
                    # Freeze it (waiting until it is stopped) until it is caught with a
                    # temporary file: the SIGKILL then lands in the middle of a write.
                    for _ in range(500):
                        os.kill(p.pid, signal.SIGSTOP)
                        os.waitpid(p.pid, os.WUNTRACED)
                        if temps(d, p.pid):
                            break
                        os.kill(p.pid, signal.SIGCONT)
                        time.sleep(rng.uniform(0, 0.005))
                    assert temps(d, p.pid), "never caught the writer between open and rename"
                p.kill()
                p.wait()
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                p.stdout.close()
            seeds.append(seed)
            stale = temps(d, p.pid)
            for name in stale:  # made under umask 0
                assert mode(os.path.join(d, name)) == 0o600, name
            check_after_crashes(d, seeds)  # the fresh store removed the dead writer's
            assert temps(d, p.pid) == []
            assert temps(d) == sorted(live)
        assert mode(d) == 0o700
        assert all(mode(os.path.join(d, n)) == 0o600 for n in os.listdir(d)
                   if not n.startswith(disk_mod.TEMP_PREFIX))
    finally:
        sleeper.kill()
        sleeper.wait()


# -- a new process --------------------------------------------------------------------------
def test_new_process_finds_every_record(tmp_path):
    d = tmp_path / "a" / "store"
    out = subprocess.run([sys.executable, WORKER, "save", str(d)], capture_output=True, text=True,
                         env=child_env(), check=True)
    added = json.loads(out.stdout)
    lengths = [len(t) // B for t in w.saved()]
    assert added == [lengths[0], lengths[1], lengths[2] - 1, lengths[3]]  # one shared block
    names = {n for t in w.saved() for n in w.key_names(t)}
    assert records(d) == {n: w.RECORD_BYTES for n in names}
    # Made under umask 0: the directory 0700, its files 0600.
    assert mode(d) == 0o700
    assert sorted(os.listdir(d)) == sorted(names | {disk_mod.MARKER, disk_mod.LOCK_NAME})
    assert {mode(d / n) for n in os.listdir(d)} == {0o600}

    env = child_env()
    env["PYTHONHASHSEED"] = "12345"
    out = subprocess.run([sys.executable, WORKER, "load", str(d)], capture_output=True, text=True,
                         env=env, check=True)
    got = json.loads(out.stdout)
    assert got["positions"] == [len(t) for t in w.saved()]  # byte-exact, checked by the child
    s = got["stats"]
    assert s["hit_tokens_disk"] == sum(len(t) for t in w.saved()) and s["hit_tokens_ram"] == 0
    assert s["records_disk"] == len(names) and s["integrity_failures"] == 0


# -- several processes at once -----------------------------------------------------------
N_WORKERS = 3
SMALL_RECORDS = 10  # the small budget holds this many records


def sample_budget(d, stop, seen):
    """Sum the record files' sizes under ``d`` until ``stop`` (``seen``: [samples,
    largest sum]).  A listing is one getdents call, atomic with renames and
    unlinks, and records never change size: a sum is at most what the directory
    held at that moment."""
    while not stop.is_set():
        if os.path.isdir(d):
            seen[0] += 1
            seen[1] = max(seen[1], sum(records(d).values()))
        time.sleep(0.0002)


def test_shared_disk_dir(tmp_path):
    """Three workers share two new directories, one under a budget smaller than
    what they save, one large enough.  Phase 1: they open them at once.  Phase 2:
    each saves the shared chains (all beginning with one block) and its own,
    and loads anyone's, in a random order, every load checked byte-exact.
    Phase 3: each loads every chain from the large one in full.  Phase 4: turns,
    one process at a time, the parent checking the LRU set between them."""
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    R = w.RECORD_BYTES
    small_budget = SMALL_RECORDS * R + R // 2
    distinct = {n for t in w.shared_prompts() + [t for u in range(N_WORKERS) for t in w.own_prompts(u)]
                for n in w.key_names(t)}
    big_budget = (len(distinct) + 5) * R
    assert len(distinct) * R > 4 * small_budget

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_WORKERS + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=w.share_worker,
                         args=(i, N_WORKERS, small, big, small_budget, big_budget, barrier, out))
             for i in range(N_WORKERS)]
    stop, seen = threading.Event(), [0, 0]
    sampler = threading.Thread(target=sample_budget, args=(small, stop, seen))
    results, after_turn = [], {}
    t = w.turns()
    names = {k: w.key_names(v) for k, v in t.items()}
    try:
        for p in procs:
            p.start()
        sampler.start()
        try:
            for _ in range(4):  # phases 1 to 3
                barrier.wait(120)
            for turn in range(5):
                barrier.wait(120)
                after_turn[turn] = set(records(small))
                barrier.wait(120)
        except threading.BrokenBarrierError:
            pass  # a worker failed: its traceback is in the queue
        for _ in procs:
            results.append(out.get(timeout=120))
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r[2] for r in results if r[0] == "error"]
    assert not errors, "\n".join(errors)

    # The budget, at every moment the parent looked (and it was reached).
    seen[1] = max(seen[1], sum(records(small).values()))
    assert seen[0] > 50
    assert seen[1] <= small_budget
    assert seen[1] == SMALL_RECORDS * R

    # The large directory: every record saved is there, added exactly once.
    assert records(big) == {n: R for n in distinct}
    stats_small = [r[2] for r in results]
    stats_big = [r[3] for r in results]
    assert sum(s["blocks_saved"] for s in stats_big) == len(distinct)
    assert sum(s["evictions_disk"] for s in stats_big) == 0
    # Every rename added a file and every eviction removed one: nothing else did.
    final = records(small)
    assert (sum(s["blocks_saved"] for s in stats_small)
            - sum(s["evictions_disk"] for s in stats_small)) == len(final)
    assert all(s["integrity_failures"] == 0 for s in stats_small + stats_big)
    assert all(s["records_ram"] == 0 for s in stats_small + stats_big)
    assert sum(r[4]["big"] for r in results) > 0  # loads of others' chains hit

    # The turns: the most recently used records the budget allows, a chain's
    # tail evicted before its head (P's two first blocks outlive its last three).
    P, Q, R_, S = names["P"], names["Q"], names["R"], names["S"]
    assert set(P) < after_turn[0] and len(after_turn[0]) == SMALL_RECORDS
    assert after_turn[1] == set(P + Q)
    assert after_turn[2] == set(P + Q)
    assert after_turn[3] == set(P + R_)
    assert after_turn[4] == set(P[:2] + R_ + S) == set(final)
    st = w.store(small)
    assert w.load_exact(st, t["P"]) == 2 * B


# -- single-process checks of what the processes above rely on ---------------------------
def test_lru_keeps_the_most_recent_records_and_chain_heads(tmp_path):
    """Saves in a burst (one kernel tick): the order is still exact."""
    st = w.store(tmp_path / "d", disk_bytes=4 * w.RECORD_BYTES)
    a, b = w.chain(1, 3), w.chain(2, 3)
    assert w.save(st, a) == 3 and w.save(st, b) == 3
    assert set(records(tmp_path / "d")) == set(w.key_names(a)[:1] + w.key_names(b))
    assert st.stats()["evictions_disk"] == 2
    assert w.load_exact(st, a) == B  # its head is what was kept
    # The load made a's head the most recent: the next record evicts b's tail.
    c = w.chain(3, 1)
    assert w.save(st, c) == 1
    assert set(records(tmp_path / "d")) == set(w.key_names(a)[:1] + w.key_names(b)[:2]
                                               + w.key_names(c))


def test_ram_tier_off(tmp_path):
    st = w.store(tmp_path / "d", ram_bytes=0)
    tokens = w.chain(5, 3)
    assert w.save(st, tokens) == 3
    assert w.save(st, tokens) == 0
    for _ in range(2):  # every hit from the files, none promoted
        assert w.load_exact(st, tokens) == len(tokens)
    s = st.stats()
    assert (s["records_ram"], s["bytes_ram"], s["promotions"], s["hit_tokens_ram"]) == (0, 0, 0, 0)
    assert s["hit_tokens_disk"] == 2 * len(tokens)
    assert (s["records_disk"], s["bytes_disk"], s["blocks_saved"]) == (3, 3 * w.RECORD_BYTES, 3)
    assert st.match(tokens) == len(tokens)


def test_threads_saving_the_same_blocks_count_each_once(tmp_path):
    """Threads of one store (RAM and disk) save the same chains at once: one of
    them puts a block in RAM, maybe another renames its file; it is added once."""
    st = w.store(tmp_path / "d", ram_bytes=1 << 20)
    prompts = [w.chain([9, j], 3) for j in range(8)]
    barrier = threading.Barrier(4)

    def worker(k):
        def run():
            barrier.wait()
            return sum(w.save(st, prompts[j]) for j in np.random.default_rng(k).permutation(8))
        return run

    added = run_threads([worker(k) for k in range(4)], barrier=barrier)
    distinct = 8 * 3
    assert sum(added) == st.stats()["blocks_saved"] == distinct
    assert len(records(tmp_path / "d")) == st.stats()["records_ram"] == distinct


def test_write_never_replaces_and_remove_spares_a_newer_file(tmp_path):
    """What a second process may do between a reader's read and its removal."""
    d = str(tmp_path / "d")
    st = w.store(d)
    tokens = w.chain(6, 1)
    w.save(st, tokens)
    key = bytes.fromhex(w.key_names(tokens)[0][:64])
    one, other = DiskTier(d, None), DiskTier(d, None)
    buf, ident = one.read(key, w.RECORD_BYTES)
    with open(os.path.join(d, w.key_names(tokens)[0]), "rb") as f:
        assert bytes(buf) == f.read()
    assert other.write(key, buf) is False  # there already: not rewritten, not added
    # Another process removes the file and writes it anew (the same inode, likely).
    assert other.remove(key) is True
    assert other.write(key, buf) is True
    assert one.remove(key, ident) is False
    assert one.holds(key)
    _, ident = one.read(key, w.RECORD_BYTES)
    assert one.remove(key, ident) is True and not one.holds(key)
    assert (one.records, one.bytes) == (0, 0)


def test_a_dead_process_with_this_pid_left_a_temporary_file(tmp_path):
    """pids come back (a restarted container's worker): its leftovers are not ours
    to remove at open, and must not stop a write."""
    d = str(tmp_path / "d")
    st = w.store(d)
    nxt = int(repr(disk_mod._counter)[len("count("):-1])
    for n in range(nxt, nxt + 3):
        open(os.path.join(d, f"{disk_mod.TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{n}"),
             "wb").close()
    tokens = w.chain(7, 2)
    assert w.save(st, tokens) == 2
    assert w.load_exact(w.store(d), tokens) == len(tokens)
    assert len(temps(d, os.getpid())) == 3  # this pid is alive: kept


@pytest.mark.parametrize("leftover", [disk_mod.LOCK_NAME, disk_mod.MARKER_TEMP])
def test_a_directory_being_made_a_store_is_not_foreign(tmp_path, leftover):
    """What another process opening the same new directory (or one killed
    doing so) leaves before the marker is there."""
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / leftover).write_bytes(b"")
    st = w.store(d)
    assert w.save(st, w.chain(8, 1)) == 1
    assert kvcache.prefix.disk.is_store_dir(d)
    assert mode(d) == 0o700  # taken over: the store's
    assert not (d / disk_mod.MARKER_TEMP).exists()
