"""How a ``python`` job starts: the agent's interpreter in isolated mode, code from memory.

The interpreter runs as ``python -I -S -c BOOT``. BOOT reads one memory file (fd 5,
closed right after) holding a small bootstrap, the sources of ``vcomp.guest`` and
its stdlib-only dependencies, extra ``sys.path`` entries (the agent's site-packages,
so optional packages such as numpy import without running ``site``), and the job's
code, which then runs as ``__main__``. Nothing is read from the agent's source tree.
"""

from __future__ import annotations

import marshal
import struct
import sys
from importlib import util as import_util
from pathlib import Path

PAYLOAD_FD = 5
GUEST_MODULES = ("vcomp", "vcomp.errors", "vcomp.domain", "vcomp.guest")
JOB_FILENAME = "<vcomp-job>"

BOOT = (
    "f=open(5,'rb');d=f.read();f.close();n=int.from_bytes(d[:4],'big');"
    "exec(compile(d[4:4+n],'<vcomp-bootstrap>','exec'),{'__builtins__':__builtins__,'blob':d[4+n:]})"
)

_ENTRY = struct.Struct(">BHI")  # kind, name length, data length
_KIND_MODULE, _KIND_PATH, _KIND_JOB, _KIND_COMPILED = 1, 2, 3, 4

BOOTSTRAP = b"""
import sys
def _vcomp_boot(blob):
    pos = 0
    job = None
    while pos < len(blob):
        kind = blob[pos]
        nlen = int.from_bytes(blob[pos + 1:pos + 3], "big")
        dlen = int.from_bytes(blob[pos + 3:pos + 7], "big")
        pos += 7
        name = blob[pos:pos + nlen].decode()
        pos += nlen
        data = blob[pos:pos + dlen]
        pos += dlen
        if kind == 1 or kind == 4:
            mod = type(sys)(name)
            mod.__file__ = "<vcomp-guest:" + name + ">"
            if "." not in name:
                mod.__path__ = []
            sys.modules[name] = mod
            if kind == 4:
                import marshal
                code = marshal.loads(data)
            else:
                code = compile(data, mod.__file__, "exec")
            exec(code, mod.__dict__)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, mod)
        elif kind == 2:
            sys.path.append(name)
        elif kind == 3:
            job = data
    main = type(sys)("__main__")
    main.__file__ = "<vcomp-job>"
    sys.modules["__main__"] = main
    sys.argv = ["<vcomp-job>"]
    return job, main
_job, _main = _vcomp_boot(blob)
del blob
exec(compile(_job, "<vcomp-job>", "exec"), _main.__dict__)
"""


def guest_sources() -> list[tuple[str, bytes]]:
    """The sources shipped into every python job, in import order."""
    sources = []
    for name in GUEST_MODULES:
        spec = import_util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot locate {name}")
        sources.append((name, Path(spec.origin).read_bytes()))
    return sources


def runtime_paths() -> list[str]:
    """Directories the interpreter reads: its prefixes and site-packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    paths.update(site_dirs())
    return sorted(p for p in paths if p)


def site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


def precompile(sources: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Marshalled code of the guest modules: saves compiling them in every job.

    Only for a job interpreter of exactly the agent's version (marshal is not stable).
    """
    return [
        (name, marshal.dumps(compile(source, f"<vcomp-guest:{name}>", "exec")))
        for name, source in sources
    ]


def build_payload(
    job_code: bytes,
    sources: list[tuple[str, bytes]],
    paths: list[str],
    *,
    compiled: bool = False,
) -> bytes:
    """``sources`` are module sources, or marshalled code when ``compiled``."""
    parts = [len(BOOTSTRAP).to_bytes(4, "big"), BOOTSTRAP]
    kind = _KIND_COMPILED if compiled else _KIND_MODULE
    for name, source in sources:
        parts.append(_entry(kind, name, source))
    for path in paths:
        parts.append(_entry(_KIND_PATH, path, b""))
    parts.append(_entry(_KIND_JOB, "", job_code))
    return b"".join(parts)


def _entry(kind: int, name: str, data: bytes) -> bytes:
    raw = name.encode()
    return _ENTRY.pack(kind, len(raw), len(data)) + raw + data


def python_argv(executable: str) -> list[str]:
    return [executable, "-I", "-S", "-c", BOOT]
