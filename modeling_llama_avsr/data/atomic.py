"""Atomic file writes: a reader, or a resumed run, never sees a half-written file."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic"]


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed onto `path` when the block succeeds, removed if it fails.

    The sibling keeps the suffix (for writers that pick a format from it) and is hidden, with the process id in its
    name, so that parallel workers never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
