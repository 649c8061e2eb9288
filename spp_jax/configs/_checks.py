"""The accepted values of every config key, checked when a config is loaded.

A rule is a predicate and the words for what it accepts; :func:`check` applies every rule
whose key the config has (a config of your own may leave keys out) and raises one
``ValueError`` naming the key, the value and what is accepted, so a bad ``--set`` fails
before any data is read or any program compiled.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check"]

Rule = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_POSITIVE_INT: Rule = (lambda v: _is_int(v) and v > 0), "a positive integer"
_COUNT: Rule = (lambda v: _is_int(v) and v >= 0), "an integer >= 0"
_POSITIVE: Rule = (lambda v: _is_real(v) and v > 0), "a number > 0"
_NON_NEGATIVE: Rule = (lambda v: _is_real(v) and v >= 0), "a number >= 0"


def _at_least(low: float) -> Rule:
    return (lambda v: _is_real(v) and v >= low), f"a number >= {low}"


def _fraction(*, open_low: bool = False, open_high: bool = False) -> Rule:
    lo, hi = "(" if open_low else "[", ")" if open_high else "]"

    def ok(v: Any) -> bool:
        if not _is_real(v):
            return False
        above = v > 0 if open_low else v >= 0
        below = v < 1 if open_high else v <= 1
        return above and below

    return ok, f"a number in {lo}0, 1{hi}"


def _one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(map(repr, choices))


def _sizes(*, empty: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return (
            isinstance(v, tuple | list)
            and (empty or len(v) > 0)
            and all(_is_int(s) and s > 0 for s in v)
        )

    return ok, f"a{'' if empty else ' non-empty'} tuple of positive integers"


def _boundaries() -> Rule:
    def ok(v: Any) -> bool:
        return (
            isinstance(v, tuple | list)
            and all(_is_real(b) and 0 < b < 1 for b in v)
            and all(a < b for a, b in itertools.pairwise(v))
        )

    return ok, "increasing fractions of the run, each in (0, 1)"


def _iou_range() -> Rule:
    return (
        lambda v: (
            isinstance(v, tuple | list)
            and len(v) == 2
            and all(_is_real(b) and 0 <= b <= 1 for b in v)
            and v[0] < v[1]
        )
    ), "a pair (low, high) with 0 <= low < high <= 1"


_OPTIMIZERS = ("sgd", "adamw")

CLASSIFICATION: dict[str, Rule] = {
    "seed": (_is_int, "an integer"),
    "shuffle_buffer": _POSITIVE_INT,
    "resize_ratio": _at_least(1.0),
    "crop_mode": _one_of("paper", "area"),
    "min_crop_area": _fraction(open_low=True),
    "model.arch": _one_of("zf5", "convnet5", "overfeat5", "overfeat7", "alexnet", "vgg16"),
    "model.head": _one_of("spp", "pool6"),
    "model.spp_mode": _one_of("max", "avg"),
    "model.channel_major": ((lambda v: isinstance(v, bool)), "True or False"),
    "model.pool5": (
        lambda v: v is None or (isinstance(v, tuple | list) and len(v) == 2 and _sizes()[0](v)),
        "None or a pair (window, stride) of positive integers",
    ),
    "model.levels": _sizes(),
    "model.width": _POSITIVE,
    "model.depth": _POSITIVE,
    "model.fc_dim": _POSITIVE_INT,
    "model.dropout_rate": _fraction(open_high=True),
    "model.base_size": _POSITIVE_INT,
    "model.dtype": _one_of("float32", "bfloat16", "float16"),
    "model.num_classes": (
        lambda v: v is None or (_is_int(v) and v > 0),
        "None (the dataset's class count) or a positive integer",
    ),
    "init_from": (
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "None or the path of a classification workdir (of `spp-jax train` or "
        "`spp-jax import-weights`)",
    ),
    "crop_size": _POSITIVE_INT,
    "size_schedule": _one_of("single", "paper", "random"),
    "train_sizes": _sizes(),
    "batch_size": _POSITIVE_INT,
    "num_epochs": _POSITIVE_INT,
    "optimizer": _one_of(*_OPTIMIZERS),
    "learning_rate": _POSITIVE,
    "momentum": _fraction(open_high=True),
    "weight_decay": _NON_NEGATIVE,
    "lr_schedule": _one_of("step", "cosine"),
    "lr_boundaries": _boundaries(),
    "warmup_epochs": _NON_NEGATIVE,
    "eval_batch_size": _POSITIVE_INT,
    "eval_every_epochs": _COUNT,
    "eval_sizes": _sizes(empty=True),  # (): no final evaluation
    "max_aspect": _at_least(1.0),
    "full_image_bucket_steps": _POSITIVE_INT,
    "checkpoint_every_steps": _COUNT,
    "keep_checkpoints": _POSITIVE_INT,
}

DETECTION: dict[str, Rule] = {
    "seed": (_is_int, "an integer"),
    "proposals.mode": _one_of("fast", "quality"),
    "proposals.max_boxes": _POSITIVE_INT,
    "proposals.min_size": _NON_NEGATIVE,
    "proposals.max_side": (lambda v: v is None or (_is_int(v) and v >= 16), "None or an int >= 16"),
    "scales": _sizes(),
    "single_scale": _POSITIVE_INT,
    "window_context": _POSITIVE,
    "window_target": _POSITIVE_INT,
    "window_rule": _one_of("paper", "code"),
    "window_pool": _one_of("max", "align"),
    "levels": (
        lambda v: v is None or _sizes()[0](v),
        "None (the backbone's levels) or a non-empty tuple of positive integers",
    ),
    "max_side": _POSITIVE_INT,
    "image_bucket": _POSITIVE_INT,
    "finetune.steps": _COUNT,
    "finetune.batch_size": _POSITIVE_INT,
    "finetune.fg_fraction": _fraction(open_low=True),
    "finetune.fg_iou": _fraction(open_low=True),
    "finetune.bg_iou": _iou_range(),
    "finetune.scales": _one_of("all", "single"),
    "finetune.optimizer": _one_of(*_OPTIMIZERS),
    "finetune.learning_rate": _POSITIVE,
    "finetune.momentum": _fraction(open_high=True),
    "finetune.weight_decay": _NON_NEGATIVE,
    "finetune.lr_boundaries": _boundaries(),
    "finetune.dropout_rate": _fraction(open_high=True),
    "finetune.eval_every": _COUNT,
    "svm.C": _POSITIVE,
    "svm.pos_weight": _POSITIVE,
    "svm.neg_iou": _fraction(),
    "svm.retrain_every": _POSITIVE_INT,
    "svm.feature_norm": _POSITIVE,
    "svm.tol": _POSITIVE,
    "bbox.lam": _NON_NEGATIVE,
    "bbox.min_iou": _fraction(),
    "test.scales": _sizes(),  # numbers of scales, each at most len(scales)
    "test.scorer": _one_of("svm", "softmax"),
    "test.nms_iou": _fraction(open_low=True),
    "test.max_per_image": _POSITIVE_INT,
    "test.draw_images": _COUNT,
    "test.svd_rank": _COUNT,
}

RULES = {"classification": CLASSIFICATION, "detection": DETECTION}


def _lookup(config: Mapping, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(config: Mapping, kind: str = "classification") -> None:
    """Raises a ``ValueError`` naming the first key whose value is not accepted.

    Args:
      config: a config (``ml_collections.ConfigDict`` or a nested dict).
      kind: ``"classification"`` (``spp-jax train``) or ``"detection"``
        (``spp-jax detect-train``; its ``backbone_overrides`` are checked as
        classification keys).

    >>> from spp_jax.configs import get_config
    >>> c = get_config("tiny")
    >>> check(c)
    >>> c.learning_rate = -1.0
    >>> check(c)
    Traceback (most recent call last):
    ...
    ValueError: config key learning_rate: got -1.0; accepted: a number > 0
    """
    if kind not in RULES:
        raise ValueError(f"unknown config kind {kind!r}; accepted: {sorted(RULES)}")
    _check_rules(config, RULES[kind], "")
    if kind == "detection":
        found, overrides = _lookup(config, "backbone_overrides")
        if found and overrides is not None:
            _check_rules(overrides, CLASSIFICATION, "backbone_overrides.")


def _check_rules(config: Mapping, rules: Mapping[str, Rule], prefix: str) -> None:
    for key, (ok, accepted) in rules.items():
        found, value = _lookup(config, key)
        if found and not ok(value):
            raise ValueError(f"config key {prefix}{key}: got {value!r}; accepted: {accepted}")
