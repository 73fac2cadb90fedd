"""Builds the C++ crossbar operator once, on first use, and caches it.

torch's extension tools compile ``crossbar_kernel.cpp`` with ninja into the
torch extensions cache (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``); later processes load the cached library. Where
no C++ compiler is present, or the build fails, :func:`crossbar_extension`
returns None and callers use the pure-torch reference.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("crossbar_kernel.cpp")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off"]


def _put_venv_ninja_on_path() -> None:
    """pip's ``ninja`` sits beside the interpreter, which is not on PATH unless activated."""
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"


def compiler_available() -> bool:
    _put_venv_ninja_on_path()
    compiler = os.environ.get("CXX", "c++")
    return shutil.which(compiler) is not None and shutil.which("ninja") is not None


@functools.cache
def crossbar_extension() -> ModuleType | None:
    """The compiled operator module, or None (with a logged reason) if it cannot be built."""
    if not compiler_available():
        log.warning("no C++ compiler or ninja found: crossbar fidelity uses the pure-torch "
                    "reference (install g++ and ninja for the compiled operator)")
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(name="xma2_crossbar", sources=[str(KERNEL_SOURCE)], extra_cflags=_FLAGS,
                    verbose=False)
    except Exception as e:  # any build failure leaves the reference in place
        log.warning("building the crossbar operator failed (%s): using the pure-torch "
                    "reference", e)
        return None
