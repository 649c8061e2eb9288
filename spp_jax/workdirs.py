"""Workdirs and output paths: checked before a command starts work.

A workdir is the folder a run writes (``config.json``, checkpoints, metrics) and later
commands read. Two kinds exist: ``"classification"`` (``spp-jax train``: ``config.json``
with a ``model`` group, ``checkpoints/``) and ``"detection"`` (``spp-jax detect-train``:
``config.json`` with ``backbone_config``, ``stages/``). The checks here turn a wrong path
into one :class:`WorkdirError` that names the path, what is wrong and what is accepted,
before any data is read or any program compiled. A trained classification workdir is
read back in one place, :func:`load_trained`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spp_jax.models import SPPNet

__all__ = [
    "KINDS",
    "Trained",
    "WorkdirError",
    "check_not_url",
    "check_output_dir",
    "check_output_file",
    "check_run_dir",
    "kind_of",
    "load_trained",
    "read_config",
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
    found = kind_of(path)
    if found is not None and found != kind:
        raise WorkdirError(
            f"workdir {path!r} holds a {found} run (written by `{WRITER[found]}`): give a new "
            f"folder or one that `{WRITER[kind]}` wrote"
        )
    return check_output_dir(path, "workdir")


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


# --------------------------------------------------------------------------------------
# Reading a trained classification workdir back.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained classification workdir, read back by :func:`load_trained`.

    Attributes:
      config: the run's ``ml_collections.ConfigDict`` (:func:`read_config`), with
        ``model.num_classes`` set.
      model: the :class:`spp_jax.models.SPPNet` that ``config.model`` describes.
      params: the latest checkpoint's parameters, for
        ``model.apply({"params": params}, ...)``.
      step: the training step of that checkpoint.
    """

    config: Any
    model: SPPNet
    params: Any
    step: int


def read_config(workdir: str | os.PathLike, kind: str = "classification") -> Any:
    """The config a run saved in ``workdir/config.json``.

    Keys the file lacks take their values from the kind's default config
    (:mod:`spp_jax.configs.default` for ``spp-jax train``, :mod:`spp_jax.configs.detection`
    for ``spp-jax detect-train``), the one place defaults live. ``model.num_classes`` is
    ``None`` where a classification file does not hold it; :func:`load_trained` then reads
    it from the checkpoint.

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json``.
    """
    from spp_jax.configs import default, detection

    defaults = {"classification": default, "detection": detection}[kind]
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {str(workdir)!r} a {WRITER[kind]} workdir?")
    with open(path) as f:
        saved = json.load(f)
    config = defaults.get_config()
    config.update(saved)
    return config


def load_trained(workdir: str | os.PathLike) -> Trained:
    """The config, model and latest parameters of a ``spp-jax train`` workdir.

    The class count is ``config.json``'s ``model.num_classes``; a file without it gives
    the count of the checkpoint's classifier (fc8), so no training data is read.

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
      WorkdirError: the checkpoint does not fit the model the config describes.
    """
    import jax
    import numpy as np

    from spp_jax import train

    workdir = str(workdir)
    config = read_config(workdir)
    manager = train.checkpoint_manager(workdir, config.keep_checkpoints)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    if config.model.num_classes is None:
        config.model.num_classes = _checkpoint_num_classes(workdir, manager.latest_step())
    model = train.create_model(config)
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 1))
    # The restore target needs only the state's structure, shapes and dtypes: traced with
    # eval_shape, the model is never run or compiled (seconds for a large net on a CPU).
    shapes = jax.eval_shape(lambda: train.create_train_state(config, model, config.crop_size, tx))
    state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = train.restore_checkpoint(manager, state)
    return Trained(config, model, state.params, int(state.step))


def _checkpoint_num_classes(workdir: str, step: int) -> int:
    """The length of fc8's bias in checkpoint ``step`` (orbax metadata: no array read).

    Raises:
      WorkdirError: the checkpoint holds no ``params/fc8/bias`` vector.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        directory,
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(create=False),
    )
    params = manager.item_metadata(step)["params"]
    bias = params.get("fc8", {}).get("bias") if hasattr(params, "get") else None
    shape = getattr(bias, "shape", None)
    if shape is None or len(shape) != 1:
        raise WorkdirError(
            f"checkpoint {directory}/{step} has no classifier bias params/fc8/bias to count "
            "the classes by: is it a checkpoint of `spp-jax train`?"
        )
    return int(shape[0])
