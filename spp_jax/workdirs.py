"""Workdirs and output paths: checked before a command starts work.

A workdir is the folder a run writes (``config.json``, checkpoints, metrics) and later
commands read. Two kinds exist: ``"classification"`` (``spp-jax train``: ``config.json``
with a ``model`` group, ``checkpoints/``) and ``"detection"`` (``spp-jax detect-train``:
``config.json`` with ``backbone_config``, ``stages/``). The checks here turn a wrong path
into one :class:`WorkdirError` that names the path, what is wrong and what is accepted,
before any data is read or any program compiled.
"""

from __future__ import annotations

import errno
import json
import os

__all__ = [
    "KINDS",
    "WorkdirError",
    "check_not_url",
    "check_output_dir",
    "check_output_file",
    "check_run_dir",
    "kind_of",
    "require",
]

KINDS = ("classification", "detection")

#: The command that writes each kind of workdir.
WRITER = {"classification": "spp-jax train", "detection": "spp-jax detect-train"}


class WorkdirError(ValueError):
    """A path that is not what a command needs; the message is one line."""


def check_not_url(workdir: str | os.PathLike) -> None:
    """A workdir must be a filesystem path (on several hosts: one that all of them
    share, e.g. NFS or a gcsfuse mount): metrics, configs and checkpoints are written
    with plain file I/O, so a URL such as ``gs://bucket/run`` would silently become a
    local directory named ``gs:`` on each host.

    Raises:
      WorkdirError: ``workdir`` is a URL.
    """
    if "://" in str(workdir):
        raise WorkdirError(
            f"workdir {str(workdir)!r} is a URL; give a filesystem path (on several hosts a "
            "shared one, e.g. NFS or a gcsfuse mount of the bucket)"
        )


def kind_of(workdir: str | os.PathLike) -> str | None:
    """``"classification"`` or ``"detection"`` from ``workdir/config.json``; ``None``
    if there is no readable config."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if "backbone_config" in config:
        return "detection"
    if "model" in config:
        return "classification"
    return None


def require(workdir: str | os.PathLike, kind: str, *, trained: bool = True) -> str:
    """Checks that ``workdir`` is a workdir of ``kind`` (with a checkpoint if
    ``trained``, for a classification run) and returns it as a string.

    Raises:
      WorkdirError: the path does not exist, is a file, has no ``config.json``, is a
        workdir of the other kind, or (``trained``) has no checkpoint yet.

    >>> require("/nonexistent/run", "classification")
    Traceback (most recent call last):
    ...
    spp_jax.workdirs.WorkdirError: workdir '/nonexistent/run' does not exist: give the --workdir of a finished `spp-jax train` run
    """  # noqa: E501
    if kind not in KINDS:
        raise ValueError(f"unknown workdir kind {kind!r}; accepted: {KINDS}")
    path = str(workdir)
    check_not_url(path)
    finished = f"the --workdir of a finished `{WRITER[kind]}` run"
    if not os.path.exists(path):
        raise WorkdirError(f"workdir {path!r} does not exist: give {finished}")
    if not os.path.isdir(path):
        raise WorkdirError(f"workdir {path!r} is a file, not a folder: give {finished}")
    found = kind_of(path)
    if found is None:
        raise WorkdirError(
            f"{path!r} is not a workdir (it has no run's config.json): give {finished}"
        )
    if found != kind:
        raise WorkdirError(
            f"{path!r} is a {found} workdir (written by `{WRITER[found]}`); this command "
            f"needs a {kind} workdir: give {finished}"
        )
    if trained and kind == "classification" and not _has_checkpoint(path):
        raise WorkdirError(
            f"workdir {path!r} has no checkpoint yet (checkpoints/ is empty): let "
            f"`{WRITER[kind]}` finish an epoch there first"
        )
    return path


def _has_checkpoint(path: str) -> bool:
    root = os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        return False
    return any(name.isdigit() for name in os.listdir(root))


def check_run_dir(workdir: str | os.PathLike, kind: str) -> str:
    """The folder a run of ``kind`` writes: new, or a workdir of the same kind (which the
    run resumes). Created here, so an unwritable place fails before any work.

    Raises:
      WorkdirError: it is a URL or a file, holds a workdir of the other kind, or cannot
        be created or written.
    """
    path = str(workdir)
    check_not_url(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path!r} is a file: give a folder (created if missing)")
    found = kind_of(path)
    if found is not None and found != kind:
        raise WorkdirError(
            f"workdir {path!r} holds a {found} run (written by `{WRITER[found]}`): give a new "
            f"folder or one that `{WRITER[kind]}` wrote"
        )
    _make_writable_dir(path, "workdir")
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> str:
    """An output folder: created if missing; it must be a folder and writable.

    Raises:
      WorkdirError: ``path`` is a file, or cannot be created or written.
    """
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{flag} {path!r} is a file: give a folder (created if missing)")
    _make_writable_dir(path, flag)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> str:
    """An output file: its folder is created if missing and must be writable; the path
    itself must not be a folder.

    Raises:
      WorkdirError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = str(path)
    if os.path.isdir(path):
        raise WorkdirError(f"{flag} {path!r} is a folder: give a file name")
    _make_writable_dir(os.path.dirname(os.path.abspath(path)), flag, shown=path)
    return path


def _make_writable_dir(path: str, flag: str, shown: str | None = None) -> None:
    shown = path if shown is None else shown
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise WorkdirError(f"{flag} {shown!r}: a parent of it is a file") from None
    except OSError as e:
        raise WorkdirError(f"{flag} {shown!r} cannot be created: {_reason(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"{flag} {shown!r} is not writable: {os.path.abspath(path)!r}")


def _reason(e: OSError) -> str:
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
        return os.strerror(e.errno)
    return e.strerror or str(e)
