"""Temporary folders in the store (uploads being imported, archives being exported), and
their removal after a crash."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SCRATCH_PREFIX = ".scratch-"


def scratch_prefix(kind: str) -> str:
    """Temporary folders in the store carry the owning process id, so that start-up can
    remove those a killed server left (see :func:`remove_orphaned_scratch`)."""
    return f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-"


def remove_orphaned_scratch(root: Path) -> list[str]:
    """Remove upload and export folders whose process is gone (or is this new one: a pid
    reused from the killed server). Older releases named them ``tmp*``."""
    removed = []
    for folder in root.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        if folder.name.startswith(SCRATCH_PREFIX):
            pid = folder.name[len(SCRATCH_PREFIX):].split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
        elif not (folder.name.startswith("tmp") and (folder / "upload.tar").exists()):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
