"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one.

Every writer puts the bytes in a temporary file in the target's own directory (so the
rename never crosses a file system), flushes them to disk with ``fsync`` (so a power loss
cannot leave the renamed file empty), then ``os.replace``-s it onto the target. A writer
that fails removes its temporary file and leaves the target as it was. Temporary names
start with a dot and end in ``.tmp``, so directory listings that look for ``.npy``,
``.npz`` or ``.json`` entries never take one for a result.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.json")
>>> atomic_write_json(path, {"b": 1, "a": 2}, sort_keys=True)
>>> open(path).read()
'{"a": 2, "b": 1}'
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import IO, Any, Literal


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on a normal exit it becomes ``path``.

    For writers that need a file name rather than a file object (a compiler's ``-o``).
    The block must create the file; it is synced to disk before the rename. If the block
    raises, the temporary file is removed and ``path`` is left untouched.

    Args:
      path: the file to write (its directory must exist).

    Yields:
      A path in ``path``'s directory that no file has (unique per process and call).
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose contents appear at ``path`` only when the block ends.

    The file gets the permissions ``open`` gives a new file (``0o666`` less the umask).
    Text mode writes UTF-8. Use it for writers that take a file object
    (``np.save``, ``np.savez``, ``json.dump``).

    Args:
      path: the file to write (its directory must exist).
      mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Yields:
      The open temporary file.

    Raises:
      ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    encoding = None if mode == "wb" else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Writes ``arrays`` to ``path`` as an uncompressed ``.npz`` (``np.savez``) atomically."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Writes ``json.dumps(obj, **dumps_kwargs)`` to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))
