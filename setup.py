"""Build of kvcache's extension modules.

Environment knobs (all optional):
  KVCACHE_DEBUG=1       Cython bounds/wraparound checks on, -O0 -g.
  KVCACHE_NATIVE=1      add -march=native to the portable files (opt-in; the
                        wheel then runs only on CPUs like the build machine).
  KVCACHE_VECTOR=N      force the compile-time path (0 scalar, 1 sse2, 4 neon).
  KVCACHE_SANITIZE=LIST build every extension with -fsanitize=LIST (a comma
                        list, e.g. address,undefined), -O1 -g
                        -fno-omit-frame-pointer, -fno-sanitize-recover=all (any
                        UBSan finding aborts) and -fno-wrapv (so that signed
                        overflow is reported).  Python itself is not
                        instrumented: run it with the sanitizer runtime
                        preloaded, as .ci/sanitize does (docs/development.md: Sanitizers).
"""
import os
import sysconfig

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KVCACHE_DEBUG", "") not in ("", "0")
# The target's machine: sysconfig.get_platform() is "linux-x86_64" on this host,
# or _PYTHON_HOST_PLATFORM in a cross build (.ci/aarch64 sets "linux-aarch64").
machine = sysconfig.get_platform().rsplit("-", 1)[-1].lower()
x86 = machine in ("x86_64", "amd64", "i686", "x86")

cflags = ["-std=c11", "-O0", "-g"] if DEBUG else ["-std=c11", "-O3"]
cflags += ["-Wno-unused-function"]
if os.environ.get("KVCACHE_NATIVE", "") not in ("", "0"):
    cflags.append("-march=native")
SANITIZE = os.environ.get("KVCACHE_SANITIZE", "").strip()
sanitize_flags = []
if SANITIZE:
    if not all(part.strip() for part in SANITIZE.split(",")):
        raise SystemExit(f"KVCACHE_SANITIZE={SANITIZE!r}: expected a comma list like address,undefined")
    # Python's own CFLAGS carry -fwrapv, which defines signed overflow: -fno-wrapv
    # undoes it so that UBSan reports an overflow in kvcache's code.
    sanitize_flags = [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                      "-g", "-fno-wrapv"]
    cflags = [f for f in cflags if not f.startswith("-O")] + ["-O0" if DEBUG else "-O1"] + sanitize_flags
if os.environ.get("KVCACHE_VECTOR"):
    cflags.append(f"-DKVC_VECTOR={int(os.environ['KVCACHE_VECTOR'])}")

# AVX2/AVX-512 code lives in its own file, compiled at the baseline with
# per-function target attributes: no -mavx* and no -march on it, ever.
simd_sources = ["src/kvc_dispatch.c"] + (["src/kvc_simd_x86.c"] if x86 else [])
baseline_cflags = [f for f in cflags if not f.startswith("-march")]


def ext(name, sources=(), extra_compile=(), extra_link=()):
    return Extension(
        f"kvcache.{name}",
        [f"kvcache/{name}.pyx", *sources],
        include_dirs=["include", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION")],
        extra_compile_args=(baseline_cflags if sources else cflags) + list(extra_compile),
        extra_link_args=list(extra_link) + sanitize_flags,
    )


extensions = [
    ext("_simd", simd_sources),
    ext("_status"),
    ext("_codec"),
    ext("_arrays"),
    ext("_arena"),
    ext("_format"),
    ext("_cold"),
    ext("_policy"),
    ext("_moves"),
    ext("_copy"),
    ext("_hot", ["src/kvc_pool.c"], extra_link=["-pthread"]),
    ext("_cache"),
]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
