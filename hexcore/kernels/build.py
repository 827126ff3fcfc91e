"""C++ loops for CPU workers, compiled for the host CPU the first time a process asks for them.

The sources are the .cpp files in csrc/ (package data: they ship with the package). torch's C++
extension loader (a C++ compiler and ninja) builds each source once per machine into torch's
extension cache; later calls and processes load that build. Where it cannot be built (no compiler),
`module()` logs why once and returns None, and the caller keeps its torch path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# -O3 and the host's vector units; -ffast-math lets loops reassociate sums and vectorise exp(). It is a
# compile flag only: the link step does not get it, so the process's float environment is untouched.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]

SOURCE_DIR = Path(__file__).parent / "csrc"


def _cpu_flags() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return flags


class CppExtension:
    """One C++ source file (a name in csrc/) and the functions it exports, built on first use. A source
    that calls another file's functions names it in `includes`: that file's text is compiled before its
    own, in the same build (and an edit to either builds anew)."""

    def __init__(self, prefix: str, source_file: str, functions: list[str], description: str,
                 includes: tuple[str, ...] = ()):
        self.prefix, self.source_file, self.functions, self.description = prefix, source_file, functions, description
        self.includes = includes
        self._lock = threading.Lock()
        self._module = None
        self._is_loaded = False

    @property
    def source_path(self) -> Path:
        return SOURCE_DIR / self.source_file

    @property
    def source(self) -> str:
        """The C++ text (its includes' first), read from the files on each call (the build reads it once)."""
        return "\n".join((SOURCE_DIR / name).read_text(encoding="utf-8") for name in (*self.includes, self.source_file))

    @property
    def build_name(self) -> str:
        return self._build_name(self.source)

    def _build_name(self, source: str) -> str:
        """The build is tuned to this CPU (-march=native): its name carries the CPU's feature flags (and
        the flags and the source text, so an edited source builds anew), so a cache shared by machines
        of different CPUs never hands one the other's build."""
        key = _cpu_flags() + " ".join(_CFLAGS) + source
        return f"{self.prefix}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def module(self):
        """The built module, or None where it cannot be built (logged once). After the first call
        this is two attribute reads: callers may ask on every use."""
        if not self._is_loaded:
            with self._lock:
                if not self._is_loaded:
                    try:
                        self._module = self._build()
                    except Exception as err:  # no compiler or ninja: the caller's torch path serves instead
                        log.warning("%s unavailable (%s); using the torch path", self.description, err)
                    finally:
                        self._is_loaded = True
        return self._module

    def _build(self):
        """Build (or load the earlier build). Processes take turns under an flock, which the OS releases
        when its holder dies; the holder first removes a lock file that torch's own builder left behind
        in a process killed mid-build (torch would otherwise wait for it forever)."""
        import ninja  # the build tool torch's loader runs: the pip package's binary, if not on PATH
        from torch.utils.cpp_extension import get_default_build_root, load_inline

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        source = self.source  # a missing file raises here: logged, and the torch path serves
        name = self._build_name(source)
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir.parent / f"{name}.flock", "w") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load_inline(name=name, cpp_sources=source, functions=self.functions,
                               extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
