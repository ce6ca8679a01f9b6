"""Build of kvcache's extension modules.

Environment knobs (all optional):
  KVCACHE_DEBUG=1       Cython bounds and initialisation checks on (boundscheck,
                        initializedcheck), -O0 -g.  wraparound stays off and
                        cdivision on, as in the release build: a debug build
                        indexes and divides exactly like a release one, it only
                        adds checks (cython_directives() below).
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
  KVCACHE_WERROR=1      make a warning in the project's own C files an error
                        (CI builds with it).

The project's own C files (src/*.c, and the headers they include) are compiled
with -Wall -Wextra, on their own flags (build_ext below); the C that Cython
generates from kvcache/*.pyx is not held to -Wextra (it is not ours).
"""
import glob
import json
import os
import sysconfig

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

try:
    from setuptools.modified import newer_group  # setuptools >= 69
except ImportError:  # pragma: no cover - older setuptools
    from distutils.dep_util import newer_group


def cython_directives(debug):
    """The Cython directives of every module: debug adds checks, nothing else.

    boundscheck and initializedcheck follow ``debug``; wraparound (off: a
    negative index is not counted from the end) and cdivision (on: C division
    and modulo, no ZeroDivisionError check) are the same in both builds.
    tests/test_build.py reads this function from this file and checks it.
    """
    return {
        "language_level": 3,
        "boundscheck": debug,
        "initializedcheck": debug,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
    }


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


DEBUG = env_flag("KVCACHE_DEBUG")
WERROR = env_flag("KVCACHE_WERROR")
# The target's machine: sysconfig.get_platform() is "linux-x86_64" on this host,
# or _PYTHON_HOST_PLATFORM in a cross build (.ci/aarch64 sets "linux-aarch64").
machine = sysconfig.get_platform().rsplit("-", 1)[-1].lower()
x86 = machine in ("x86_64", "amd64", "i686", "x86")

cflags = ["-std=c11", "-O0", "-g"] if DEBUG else ["-std=c11", "-O3"]
if env_flag("KVCACHE_NATIVE"):
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
# per-function target attributes: no -mavx* and no -march on it, ever.  Every
# file of src/ is compiled at the baseline, and so is the Cython C of a module
# that links one (as when the two shared the module's flags).
simd_sources = ["src/kvc_dispatch.c"] + (["src/kvc_simd_x86.c"] if x86 else [])
baseline_cflags = [f for f in cflags if not f.startswith("-march")]
# Cython's generated C defines static helpers it may not use.
cython_cflags = ["-Wno-unused-function"]
own_cflags = baseline_cflags + ["-Wall", "-Wextra"] + (["-Werror"] if WERROR else [])
headers = sorted(glob.glob("include/*.h"))
own_compile_args = {}  # extension name -> the arguments of its src/*.c files


def ext(name, sources=(), extra_compile=(), extra_link=()):
    """kvcache.NAME from kvcache/NAME.pyx, linked with the project's C files ``sources``."""
    own_compile_args[f"kvcache.{name}"] = own_cflags + list(extra_compile)
    return Extension(
        f"kvcache.{name}",
        [f"kvcache/{name}.pyx", *sources],
        include_dirs=["include", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION")],
        extra_compile_args=(baseline_cflags if sources else cflags) + cython_cflags + list(extra_compile),
        extra_link_args=list(extra_link) + sanitize_flags,
        depends=headers,
    )


class build_ext(_build_ext):
    """Compiles an extension's own C files (src/) with own_compile_args, not with
    the flags of its Cython C, and links their objects into it."""

    def build_extension(self, ext):
        own = [s for s in ext.sources if os.path.normpath(s).startswith("src" + os.sep)]
        if not own:
            return super().build_extension(ext)
        saved = ext.sources, ext.depends, ext.extra_objects
        try:
            # still inputs of the module (a change relinks it), no longer its sources
            ext.sources = [s for s in ext.sources if s not in own]
            ext.depends = list(ext.depends) + own
            if self.force or newer_group(ext.sources + ext.depends, self.get_ext_fullpath(ext.name), "newer"):
                macros = ext.define_macros + [(undef,) for undef in ext.undef_macros]
                objects = self.compiler.compile(own, output_dir=self.build_temp, macros=macros,
                                                include_dirs=ext.include_dirs, debug=self.debug,
                                                extra_postargs=own_compile_args[ext.name],
                                                depends=ext.depends)
                ext.extra_objects = objects + list(ext.extra_objects)
            super().build_extension(ext)
        finally:
            ext.sources, ext.depends, ext.extra_objects = saved


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
    ext("_persist"),
    ext("_cache"),
    ext("_blocks", ["src/kvc_pool.c"], extra_link=["-pthread"]),
]

# cythonize regenerates kvcache/*.c only when a .pyx or .pxd is newer than it:
# the directives the C was generated with are kept beside it, and other ones (a
# switch of KVCACHE_DEBUG) regenerate every module.
directives_stamp = "kvcache/.cython-directives.json"


def directives_changed(directives):
    try:
        with open(directives_stamp) as f:
            return json.load(f) != directives
    except (OSError, ValueError):
        return True


directives = cython_directives(DEBUG)
modules = cythonize(extensions, compiler_directives=directives, force=directives_changed(directives))
with open(directives_stamp, "w") as f:
    json.dump(directives, f)
setup(ext_modules=modules, cmdclass={"build_ext": build_ext})
