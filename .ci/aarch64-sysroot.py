"""An aarch64 Debian (bookworm) CPython in a folder, for .ci/aarch64.

    python .ci/aarch64-sysroot.py CACHE_DIR SYSROOT

Resolves the packages below and their library dependencies in Debian's arm64
Packages index, downloads the .debs into CACHE_DIR/debs (kept: one file per
version, checked against the index's SHA256), and unpacks them with `dpkg -x`
into SYSROOT, a fresh folder.  Nothing is installed on the host: no dpkg
database, no foreign architecture, no `apt-get install ...:arm64`.
Absolute symlinks are made relative so that `qemu-aarch64 -L SYSROOT` resolves
them inside SYSROOT.  Writes SYSROOT/manifest.txt (package version) last.
"""
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import urllib.request

MIRROR = os.environ.get("KVCACHE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
INDEX = f"{MIRROR}/dists/bookworm/main/binary-arm64/Packages.xz"
# The interpreter and its standard library (with their shared libraries), the
# C headers (libpython3.11-dev, without its dependencies: only its headers are
# used) and the C++ runtime that manylinux wheels (ml_dtypes) expect from the system.
WANTED = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
HEADERS_ONLY = ["libpython3.11-dev"]
# Dependencies that are not shared libraries the interpreter loads.
NOT_NEEDED = {"dpkg", "tar", "media-types", "mime-support", "readline-common", "tzdata",
              "debconf", "libtirpc-common", "gcc-12-base"}


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def parse_index(data):
    index, provides = {}, {}
    for para in lzma.decompress(data).decode().split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", para, re.M))
        if "Package" not in fields:
            continue
        index.setdefault(fields["Package"], fields)
        for p in fields.get("Provides", "").split(","):
            if p.strip():
                provides.setdefault(p.split()[0], fields["Package"])
    return index, provides


def resolve(index, provides):
    """WANTED and their Depends/Pre-Depends closure (first alternative), then HEADERS_ONLY."""
    todo, seen = list(WANTED), []
    while todo:
        name = todo.pop()
        name = name if name in index else provides.get(name, name)
        if name in seen or name in NOT_NEEDED:
            continue
        if name not in index:
            sys.exit(f"aarch64-sysroot: {name} is not in {INDEX}")
        seen.append(name)
        deps = index[name].get("Pre-Depends", "") + "," + index[name].get("Depends", "")
        todo += [d.split("|")[0].split()[0].split(":")[0] for d in deps.split(",") if d.strip()]
    return [index[n] for n in sorted(seen) + HEADERS_ONLY]


def download(pkg, debs):
    path = os.path.join(debs, os.path.basename(pkg["Filename"]))
    if not os.path.exists(path):
        data = fetch(f"{MIRROR}/{pkg['Filename']}")
        if hashlib.sha256(data).hexdigest() != pkg["SHA256"]:
            sys.exit(f"aarch64-sysroot: SHA256 mismatch for {pkg['Filename']}")
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
    return path


def relative_symlinks(root):
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            if os.path.islink(p) and os.readlink(p).startswith("/"):
                target = os.path.join(root, os.readlink(p).lstrip("/"))
                os.unlink(p)
                os.symlink(os.path.relpath(target, d), p)


def main(cache, sysroot):
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    print(f"aarch64-sysroot: resolving in {INDEX}", flush=True)
    packages = resolve(*parse_index(fetch(INDEX)))
    if os.path.exists(sysroot):
        shutil.rmtree(sysroot)
    os.makedirs(sysroot)
    for pkg in packages:
        subprocess.run(["dpkg", "-x", download(pkg, debs), sysroot], check=True)
    relative_symlinks(sysroot)
    with open(os.path.join(sysroot, "manifest.txt"), "w") as f:
        f.writelines(f"{p['Package']} {p['Version']}\n" for p in packages)
    print(f"aarch64-sysroot: {len(packages)} packages unpacked into {sysroot}")


if __name__ == "__main__":
    main(*sys.argv[1:])
