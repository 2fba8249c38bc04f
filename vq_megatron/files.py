"""Atomic file writes: a file appears under its final name complete, or not at all (pure stdlib).

Content is written to a fresh temporary name in the target's own directory -- so that `os.replace`
onto the target is a rename within one file system, which is atomic -- and renamed into place only
when writing succeeded. A reader therefore sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

__all__ = ["temp_path", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "sha256_file"]


def temp_path(final_path: str | Path, suffix: str = ".tmp") -> Path:
    """A unique hidden name next to final_path (pid + random part: concurrent writers never collide)."""
    final = Path(final_path)
    return final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def atomic_path(final_path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to final_path, on any error (also
    KeyboardInterrupt) it is removed and an existing final_path is left as it was."""
    tmp = temp_path(final_path, suffix)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        # Not mkstemp: its 0600 mode would survive the rename; open() honours the umask.
        with open(tmp, "xb") as handle:
            handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks so that a large checkpoint file is never held in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
