"""Builds the C++ crossbar operator once, on first use, and caches it.

torch's extension tools compile ``crossbar_kernel.cpp`` with ninja into the
torch extensions cache (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``), under a name that hashes the source, its path and
the flags; later processes of the same checkout load the cached library. Where
no C++ compiler is present, or the build fails, :func:`crossbar_extension`
returns None and callers use the pure-torch reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("crossbar_kernel.cpp")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
_PARALLEL_FLAGS = ("-fopenmp",)
"""torch's ``at::parallel_for`` is an inline OpenMP loop (ATen/ParallelOpenMP.h): compiled
without OpenMP, the operator's loops run on one thread whatever ``torch.set_num_threads``
says. A compiler without OpenMP still gets the single-threaded build."""


def _put_venv_ninja_on_path() -> None:
    """pip's ``ninja`` sits beside the interpreter, which is not on PATH unless activated."""
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"


def compiler_available() -> bool:
    _put_venv_ninja_on_path()
    compiler = os.environ.get("CXX", "c++")
    return shutil.which(compiler) is not None and shutil.which("ninja") is not None


STALE_LOCK_S = 600
"""A build lock older than this was left by a killed build (one takes about a minute):
torch's loader would wait on it forever."""


def _clear_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing the crossbar operator's build lock %s, left %.0f s ago by a "
                    "build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def extension_name(parallel: bool = True) -> str:
    """The build's name in the shared cache, from a hash of the source, its path and
    the flags: two versions of the operator never load each other's library, and two
    checkouts of the same version do not share a build folder, where each load would
    find the other's source path in the build file and rebuild (about a minute)."""
    digest = hashlib.sha256(KERNEL_SOURCE.read_bytes())
    digest.update(str(KERNEL_SOURCE.resolve()).encode())
    digest.update(" ".join(_FLAGS + (_PARALLEL_FLAGS if parallel else ())).encode())
    return f"xma2_crossbar_{digest.hexdigest()[:12]}"


@functools.cache
def crossbar_extension() -> ModuleType | None:
    """The compiled operator module, or None (with a logged reason) if it cannot be built."""
    if not compiler_available():
        log.warning("no C++ compiler or ninja found: crossbar fidelity uses the pure-torch "
                    "reference (install g++ and ninja for the compiled operator)")
        return None
    from torch.utils.cpp_extension import _get_build_directory, load

    failure: Exception | None = None
    for parallel in (True, False):
        name = extension_name(parallel)
        extra = _PARALLEL_FLAGS if parallel else ()
        _clear_stale_lock(Path(_get_build_directory(name, verbose=False)) / "lock")
        try:
            # fresh lists: torch appends its own libraries to the ones it is given
            module: ModuleType = load(name=name, sources=[str(KERNEL_SOURCE)],
                                      extra_cflags=[*_FLAGS, *extra], extra_ldflags=[*extra],
                                      verbose=False)
        except Exception as e:  # try without OpenMP, then leave the reference in place
            failure = e
            if parallel:
                log.warning("building the crossbar operator with OpenMP failed (%s): "
                            "building it single-threaded", e)
            continue
        return module
    log.warning("building the crossbar operator failed (%s): using the pure-torch "
                "reference", failure)
    return None


if __name__ == "__main__":  # `python -m core.ops.extension`: build it now (set-up, images)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = crossbar_extension()
    log.info("crossbar operator %s", "built" if built is not None else "not built")
    sys.exit(0 if built is not None else 1)
