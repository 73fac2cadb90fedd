"""A task version as one tar file an operator can move between servers.

An archive holds exactly ``manifest.json`` and ``task.safetensors`` at its top level
(plain or gzip/bz2/xz-compressed tar). Reading one trusts nothing: every member must be
a regular file with one of those two names, appear once, fit the size limits, and match
the size and SHA-256 its manifest records. Nothing is extracted to disk by name and
nothing is unpickled.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from core.atomic import atomic_write_bytes
from task_store.errors import ChecksumMismatch, FormatError
from task_store.format import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    TENSORS_FILE,
    VERSION_FILES,
    Manifest,
    sha256_hex,
)

DEFAULT_MAX_ARCHIVE_BYTES = 4 * 2**30


def write_archive(dest: str | Path, manifest_bytes: bytes, tensors: bytes) -> Path:
    """Write a reproducible tar (fixed owner, mode and times) atomically."""
    dest = Path(dest)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_FILE, manifest_bytes), (TENSORS_FILE, tensors)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, buffer.getvalue())
    return dest


def read_archive(path: str | Path, *,
                 max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> tuple[Manifest, bytes]:
    """The manifest and verified tensor file of an archive, or a :class:`FormatError`."""
    path = Path(path)
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                where = f"archive {path.name}: member {member.name!r}"
                if member.name not in VERSION_FILES:
                    raise FormatError(f"{where} is not one of {list(VERSION_FILES)}; "
                                      "export the task again with this xma2")
                if not member.isreg():
                    raise FormatError(f"{where} is not a regular file")
                if member.name in members:
                    raise FormatError(f"{where} appears twice")
                limit = MAX_MANIFEST_BYTES if member.name == MANIFEST_FILE else max_bytes
                total += member.size
                if member.size > limit or total > max_bytes:
                    raise FormatError(f"{where} is {member.size} bytes, over the "
                                      f"{min(limit, max_bytes)}-byte limit")
                stream = tar.extractfile(member)
                if stream is None:
                    raise FormatError(f"{where} cannot be read")
                data = stream.read(member.size + 1)
                if len(data) != member.size:
                    raise FormatError(f"{where} is truncated")
                members[member.name] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FormatError(f"archive {path.name} is not a readable task archive: "
                          f"{type(e).__name__}") from e
    missing = [n for n in VERSION_FILES if n not in members]
    if missing:
        raise FormatError(f"archive {path.name} lacks {missing}")
    manifest = Manifest.from_json(members[MANIFEST_FILE])
    if set(manifest.files) != set(members) - {MANIFEST_FILE}:
        raise FormatError(f"archive {path.name}: members do not match the manifest's files")
    data = members[TENSORS_FILE]
    record = manifest.files[TENSORS_FILE]
    if len(data) != record.bytes or sha256_hex(data) != record.sha256:
        raise ChecksumMismatch(f"archive {path.name}: {TENSORS_FILE} does not match the "
                               "size and SHA-256 in its manifest (damaged in transfer?)")
    return manifest, data
