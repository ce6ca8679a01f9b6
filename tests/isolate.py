"""Run a test body in a forked child, so that a crash fails that test, not the run.

``isolated(fn)`` forks the test process; ``isolated_call(module, function, *args)``
forks a small server process instead (see below).  Either way the child runs
the body and reports through a pipe: an exception (an assertion, ``pytest.raises``
not raising...) comes back as its formatted traceback and fails the test with
it; a death by a signal (SIGSEGV, SIGBUS, SIGABRT...) fails it naming the
signal, with the child's stderr (faulthandler's traceback); a hang past
``timeout`` fails it too (the child is killed).

Why not pytest-forked: it needs the deprecated ``py`` library and has no
timeout (a deadlock still hangs the run); and it forks the test process
itself, which is slow here: with torch imported the process holds ~170 MB of
anonymous memory, and each fork, copy-on-write and exit of it costs ~25 ms of
CPU.  A case needing neither torch nor the test process's state is therefore
run by ``isolated_call``: a server, started once in a fresh interpreter that
imports kvcache, numpy and the test module but not torch (and calls the
module's ``warm_up()``, if any, once), forks one child per case (~3 ms).

Forking is safe here: kvcache's store_layers pool is fork-safe by design (a
child starts with an empty pool), and the cases keep torch tensors small
enough that torch never starts its own thread pool.
"""
import atexit
import faulthandler
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import pytest


def _fork_run(fn, timeout):
    """Run ``fn()`` in a forked child: ``("pass" | "fail" | "crash" | "hang", message)``."""
    r, w = os.pipe()
    err = tempfile.TemporaryFile()
    gc.freeze()  # the child's collections must not touch (so copy) every page of the parent's heap
    pid = os.fork()
    if pid == 0:  # the child: never return to the caller
        try:
            os.close(r)
            os.dup2(err.fileno(), 2)
            try:
                fn()
                report = b"+"
            except BaseException:  # pytest.fail / pytest.raises' Failed are BaseExceptions
                report = b"-" + traceback.format_exc().encode(errors="replace")
            with os.fdopen(w, "wb") as pipe:
                pipe.write(report)
        finally:
            os._exit(0)
    gc.unfreeze()
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(r, "rb", buffering=0) as pipe, err:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "hang", f"the case hung: killed after {timeout:.0f} s"
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    report = b"".join(chunks).decode(errors="replace")
    if report == "+":
        return "pass", ""
    if report:
        return "fail", report[1:] + (f"\n--- stderr ---\n{stderr}" if stderr else "")
    how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
           else f"exited with status {os.WEXITSTATUS(status)} before reporting")
    return "crash", f"the case crashed the process: {how}\n--- stderr ---\n{stderr}"


def _fail(kind, message):
    if kind != "pass":
        pytest.fail(message, pytrace=False)


def isolated(fn, timeout=60.0):
    """Run ``fn()`` in a fork of this process; fail the calling test with its exception, crash or hang."""
    if os.environ.get("KVCACHE_TEST_NOFORK"):  # profiling the tests themselves
        return fn()
    _fail(*_fork_run(fn, timeout))


_server = None


def _start_server():
    global _server
    if _server is None or _server.poll() is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   KVCACHE_TEST_SERVER="1")
        _server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env=env, text=True)
        atexit.register(_stop_server, _server)
    return _server


def _stop_server(server):
    server.stdin.close()  # the server exits at EOF
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


def isolated_call(module, function, *args, timeout=60.0):
    """Run ``module.function(*args)`` (JSON arguments) in a child of the fork server."""
    if os.environ.get("KVCACHE_TEST_NOFORK"):
        return getattr(importlib.import_module(module), function)(*args)
    server = _start_server()
    server.stdin.write(json.dumps([module, function, list(args), timeout]) + "\n")
    server.stdin.flush()
    line = server.stdout.readline()
    if not line:
        pytest.fail(f"the fork server died (status {server.wait()})", pytrace=False)
    _fail(*json.loads(line))


def _serve():
    """The fork server: one request per line on stdin, one JSON answer per line on stdout."""
    faulthandler.enable()  # a crashing child writes its Python traceback to its stderr
    warm = set()
    for line in sys.stdin:
        module, function, args, timeout = json.loads(line)
        mod = importlib.import_module(module)
        if module not in warm and hasattr(mod, "warm_up"):
            mod.warm_up()  # first-use costs (lazy imports, caches) paid once, not in every child
            warm.add(module)
        fn = getattr(mod, function)
        print(json.dumps(_fork_run(lambda: fn(*args), timeout)), flush=True)


if __name__ == "__main__":
    _serve()
