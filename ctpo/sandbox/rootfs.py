"""The sandbox's root filesystem, planned on the host (`fs_plan`): what `_child.py` binds, links and hides.

Only the interpreter, its standard library, the packages in `SANDBOX_PACKAGES` (under `SANDBOX_SITE`) and a
few /etc files are visible inside; site-packages directories, the project root and home directories are
covered. The plan is computed once per process.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

# The packages model code may import (plus the standard library); nothing else of the host's
# site-packages is visible. Missing ones are skipped. Their bundled shared libraries (NAME.libs) come along.
SANDBOX_PACKAGES = ("numpy", "sympy", "mpmath", "scipy", "networkx", "gmpy2")
SANDBOX_SITE = "/sandbox/site-packages"  # where they appear inside the sandbox
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")


@functools.lru_cache(maxsize=None)
def site_dirs() -> list[str]:
    """This interpreter's site-packages (what an unisolated sandbox imports from)."""
    import site

    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def host_site_dirs() -> list[str]:
    """Every directory the host interpreter may import third-party code from."""
    import site
    import sysconfig

    cands = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"], "/usr/lib/python3/dist-packages",
             f"/usr/local/lib/python{sys.version_info.major}.{sys.version_info.minor}/dist-packages"]
    cands += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    cands.append(os.path.join(os.path.dirname(os.__file__), "site-packages"))  # the base interpreter's
    return list(dict.fromkeys(os.path.realpath(c) for c in cands if c and os.path.isdir(c)))


def package_paths(name: str, dirs: list[str]) -> list[str]:
    """Host paths making up importable package `name`: the package (dir, module or extension), its
    bundled libraries (NAME.libs) and metadata (NAME-VERSION.dist-info), from the first dir that has it."""
    norm = name.lower().replace("-", "_")
    for d in dirs:
        entries = os.listdir(d)
        hits = [e for e in entries if e == name or e == name + ".py"
                or (e.startswith(name + ".") and e.endswith(".so") and "cpython" in e)]
        if hits:
            extra = [e for e in entries if e.lower() in (f"{norm}.libs", f"{name}.libs")
                     or (e.endswith(".dist-info") and e.lower().split("-")[0].replace("-", "_") == norm)]
            return [os.path.join(d, e) for e in hits + extra]
    return []


def inside(path: str, root: str) -> bool:
    """`path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=None)
def fs_plan() -> tuple[tuple, tuple, tuple, str]:
    """(binds, symlinks, hide, executable) of the sandbox's root filesystem; see _child.py.

    binds: (host source, target inside, dir|file): system dirs, the interpreter binary, libpython, the
    standard library, the allowed packages (under SANDBOX_SITE), /etc/ld.so.cache and /etc/localtime.
    hide: host paths inside a bound tree that are covered by an empty tmpfs (site-packages dirs, the
    project root, home directories), so e.g. a system python's dist-packages stays invisible."""
    import sysconfig

    binds: list[tuple[str, str, str]] = []
    links: list[tuple[str, str]] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            binds.append((d, d, "dir"))

    def covered(p: str) -> bool:
        return any(kind == "dir" and inside(p, dst) for _, dst, kind in binds)

    exe = os.path.realpath(sys.executable)
    files = [exe] + [os.path.realpath(f) for f in _ETC_FILES if os.path.exists(f)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")
        if os.path.isfile(lib):
            files.append(lib)
            files.append(os.path.realpath(lib))
    for f, dst in zip(files, [exe] + [f for f in _ETC_FILES if os.path.exists(f)] + [None, None]):
        dst = dst or f
        if not covered(dst) and all(b[1] != dst for b in binds):
            binds.append((f, dst, "file"))
    # the base interpreter's standard library and lib-dynload (never a venv's lib dir: it holds site-packages)
    stdlib = [os.path.dirname(os.__file__)] + [p for p in sys.path if p.endswith("lib-dynload")]
    for d in dict.fromkeys(os.path.realpath(p) for p in stdlib):
        if os.path.isdir(d) and not covered(d):
            binds.append((d, d, "dir"))
    site_dirs = host_site_dirs()
    for name in SANDBOX_PACKAGES:
        for p in package_paths(name, site_dirs):
            binds.append((p, f"{SANDBOX_SITE}/{os.path.basename(p)}", "dir" if os.path.isdir(p) else "file"))
    repo = str(Path(__file__).resolve().parents[2])
    homes = [os.path.expanduser("~"), "/root", "/home", "/run", "/var/run", repo, os.getcwd()]
    hide = [h for h in dict.fromkeys(os.path.realpath(h) for h in site_dirs + homes)
            if covered(h) and not any(inside(dst, h) for _, dst, _ in binds)]
    return tuple(binds), tuple(links), tuple(sorted(hide)), exe
