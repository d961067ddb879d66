"""Atomic file output: a run that fails or is interrupted leaves no half-written file behind.

Every artifact is first written to a temporary file in the destination directory (same file
system, so the final ``os.replace`` is atomic), and only renamed into place once complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any long work starts."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".quantkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise QuantkitError(f"output directory {out} is not writable ({exc.strerror or exc}); choose another --out") from None
    return out


def _public_mode(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give the result the permissions a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _public_mode(tmp_path)
        os.replace(tmp_path, dest)
    finally:  # also on KeyboardInterrupt: never leave the temporary file behind
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_files_atomic(files: dict[Path, bytes]) -> list[Path]:
    """Write a set of files so that either all of them appear or none is touched.

    All contents are staged as temporary files first; the renames happen only after every file
    was written, so an interruption during staging leaves the destination unchanged.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for dest, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            _public_mode(tmp)
            staged.append((Path(tmp), dest))
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return list(files)
