"""Atomic file writes: the one way CLADNet puts secrets and state on disk."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader (or a crash) sees the old file or the
    new one, never half, and the file is never readable beyond ``mode`` (0600 unless
    told): written to a temporary file in the same directory, created 0600 by
    ``mkstemp``, then renamed over ``path``.

    ``durable`` (the default) fsyncs the file before the rename and the directory
    after it, so the new content survives a power loss; callers that rewrite a file
    every few seconds and can lose the last write pass False.
    """
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
