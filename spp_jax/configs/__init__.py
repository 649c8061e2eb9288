"""Training and detection configs, installed with the package.

Each module has ``get_config()`` returning an ``ml_collections.ConfigDict``. ``default``
holds every key that :func:`spp_jax.train.train_and_evaluate` reads, with its meaning;
the others start from ``default.get_config()`` and override a few keys, so every
default lives in one place. Run one with
``spp-jax train --config NAME --workdir DIR [--set key=value ...]`` from any
directory; :func:`available` lists the names.

A config of your own is a ``.py`` file with ``get_config()``, passed by path
(``spp-jax train --config path/to/mine.py``); it can start from a shipped one::

    from spp_jax.configs import default

    def get_config():
        c = default.get_config()
        c.num_epochs = 4
        return c
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from spp_jax.configs._checks import check
from spp_jax.workdirs import KINDS

__all__ = ["available", "check", "get_config"]


def available(kind: str = "classification") -> tuple[str, ...]:
    """Names of the shipped configs of one kind, sorted: ``"classification"``
    (``spp-jax train``) or ``"detection"`` (``spp-jax detect-train``; a module says
    so with ``KIND = "detection"``).

    >>> available()
    ('default', 'nospp', 'single', 'tiny', 'zf5_imagenet')
    >>> available("detection")
    ('detection', 'detection_tiny', 'detection_voc07', 'detection_voc07_vgg16')
    """
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; accepted: {KINDS}")
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return tuple(
        n
        for n in names
        if getattr(importlib.import_module(f"{__name__}.{n}"), "KIND", "classification") == kind
    )


def get_config(name: str, kind: str = "classification") -> Any:
    """``get_config()`` of the shipped config ``name`` of ``kind`` (an
    ``ml_collections.ConfigDict``).

    Raises:
      ValueError: ``name`` is not one of :func:`available` ``(kind)``.
    """
    names = available(kind)
    if name not in names:
        raise ValueError(f"unknown config {name!r}; accepted: {', '.join(map(repr, names))}")
    return importlib.import_module(f"{__name__}.{name}").get_config()
