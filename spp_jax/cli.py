"""The ``spp-jax`` command line.

``spp-jax demo`` (the default) pools feature maps of several sizes, and a padded
mixed-size batch, into fixed-length vectors, checks them against the per-size
results and prints what happened. It needs no data and no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import workdirs
from spp_jax.geometry import output_dim, pyramid_bins
from spp_jax.pooling import spatial_pyramid_pool

log = logging.getLogger("spp_jax")


def demo(levels=(6, 3, 2, 1), channels: int = 256, batch: int = 4) -> dict:
    """Pools random feature maps of several sizes; returns a summary dict."""
    sizes = [(13, 13), (10, 10), (17, 23), (5, 7)]
    dim = output_dim(channels, levels)
    log.info("levels=%s, C=%d -> every input becomes a %d-d vector", levels, channels, dim)
    pool = jax.jit(spatial_pyramid_pool, static_argnames=("levels",))
    rng = np.random.default_rng(0)
    per_size = {}
    for h, w in sizes:
        x = jnp.asarray(rng.standard_normal((batch, h, w, channels), np.float32))
        t0 = time.perf_counter()
        y = jax.block_until_ready(pool(x, levels=levels))
        ms = (time.perf_counter() - t0) * 1e3
        rows = [lb.rows for lb in pyramid_bins(h, w, levels)]
        log.info(
            "  input %2dx%-2d -> %s (first call, compile included: %.0f ms); row bins of "
            "the finest level: %s",
            h,
            w,
            tuple(y.shape),
            ms,
            rows[0],
        )
        assert y.shape == (batch, dim)
        per_size[(h, w)] = (x, y)

    # One padded batch of mixed sizes, one compiled program, valid_sizes per example.
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    padded = np.full((len(sizes), hmax, wmax, channels), np.nan, np.float32)
    for i, (h, w) in enumerate(sizes):
        padded[i, :h, :w] = np.asarray(per_size[(h, w)][0][0])
    y = pool(jnp.asarray(padded), levels=levels, valid_sizes=np.array(sizes))
    worst = max(float(jnp.max(jnp.abs(y[i] - per_size[s][1][0]))) for i, s in enumerate(sizes))
    log.info(
        "padded mixed-size batch %s with valid_sizes -> %s, max |diff| vs per-size "
        "pooling: %g (padding held NaN)",
        padded.shape,
        tuple(y.shape),
        worst,
    )
    return {"dim": dim, "sizes": sizes, "padded_max_abs_diff": worst}


def load_config(
    name_or_path: str, overrides: list[str] | None = None, kind: str = "classification"
):
    """Loads a config and applies ``--set`` overrides.

    Args:
      name_or_path: the name of a shipped config (:func:`spp_jax.configs.available`:
        ``default``, ``tiny``, ...), found from any directory, or the path of a ``.py``
        file with a ``get_config()`` of its own (which may start from
        ``spp_jax.configs.default.get_config()``).
      overrides: ``key=value`` items with dotted keys (``model.width=0.5``); a value is
        parsed as a Python literal when it is one (``0.5``, ``(112, 90)``, ``None``).
        The groups in :data:`_OPEN_GROUPS` (a detection config's
        ``backbone_overrides``) take new keys (``backbone_overrides.num_epochs=1``).
      kind: ``"classification"`` (``spp-jax train``) or ``"detection"``
        (``spp-jax detect-train``): which shipped names are accepted.

    Returns:
      The ``ml_collections.ConfigDict``.

    Raises:
      SystemExit: an unknown name, a missing file, a file without ``get_config()``, an
        override of a key the config does not have, or a value the key does not accept
        (:func:`spp_jax.configs.check`); the message names it.
    """
    from spp_jax import configs

    config = _base_config(name_or_path, kind)
    for item in overrides or []:
        _apply_override(config, item)
    try:
        configs.check(config, kind)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return config


def _base_config(name_or_path: str, kind: str):
    """The shipped config ``name_or_path`` of ``kind``, or the ``get_config()`` of the
    ``.py`` file at that path (:func:`load_config`)."""
    from pathlib import Path

    from spp_jax import configs

    names = configs.available(kind)
    path = Path(name_or_path)
    if name_or_path in names:
        return configs.get_config(name_or_path, kind)
    if path.suffix == ".py" and path.is_file():
        spec = importlib.util.spec_from_file_location(f"spp_config_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot import config file {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise SystemExit(f"config file {path} has no get_config() function")
        return module.get_config()
    raise SystemExit(
        f"config {name_or_path!r} not found; give one of {list(names)} or the path of a "
        ".py file with get_config()"
    )


def _apply_override(config, item: str) -> None:
    """Sets the ``--set`` item ``key=value`` in ``config`` (:func:`load_config`)."""
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--set takes key=value, got {item!r}")
    *parents, leaf = key.split(".")
    node, is_open = _override_group(config, item, parents)
    if leaf not in node and not is_open:
        raise SystemExit(
            f"--set {item!r}: no key {key!r} in the config; keys: {sorted(node.keys())}"
        )
    value = _override_value(text, node.get(leaf))
    try:
        with config.unlocked():
            node[leaf] = value
    except TypeError as e:
        raise SystemExit(
            f"--set {item!r}: {key} is a {type(node[leaf]).__name__} "
            f"(now {node[leaf]!r}), got {value!r}"
        ) from e


def _override_group(config, item: str, parents: list[str]) -> tuple[Any, bool]:
    """The group that the dotted ``parents`` name in ``config``, and whether it takes new
    keys (it lies in one of :data:`_OPEN_GROUPS`, where missing groups are created)."""
    node, is_open = config, False
    for part in parents:
        if is_open and part not in node:
            with config.unlocked():
                node[part] = {}
        if part not in node or not hasattr(node[part], "keys"):
            raise SystemExit(
                f"--set {item!r}: no group {part!r} in the config; keys: {sorted(node.keys())}"
            )
        is_open = is_open or (node is config and part in _OPEN_GROUPS)
        node = node[part]
    return node, is_open


def _override_value(text: str, current: Any) -> Any:
    """``text`` as a Python literal when it is one (a list as a tuple), else the string;
    for a key whose ``current`` value is a float an int becomes a float, and for a bool
    ``true`` or ``false`` (any case) a bool."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, bool) and text.lower() in ("true", "false"):
        value = text.lower() == "true"
    return value


#: Config groups that ``--set`` may add keys to: a detection config's overrides of its
#: backbone's classification config (``--set backbone_overrides.num_epochs=1``).
_OPEN_GROUPS = ("backbone_overrides",)


def _init_distributed(args) -> None:
    """``jax.distributed.initialize`` from flags, environment, or auto-detection."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
        pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
        if num is None or pid is None:
            raise SystemExit(
                f"coordinator address {address!r} given, but not the process count and this "
                "process's index: pass --num-processes and --process-id (or set "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID), or use --distributed on a TPU pod "
                "or under SLURM"
            )
        jax.distributed.initialize(address, num_processes=int(num), process_id=int(pid))
    elif args.distributed:
        jax.distributed.initialize()  # TPU pods, SLURM, ... fill in everything themselves
    else:
        return
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


# ------------------------------------------------------------------------- detection


def _indented(text: str) -> str:
    """``text`` with every line indented two spaces (continuation lines of a log line)."""
    return "\n".join("  " + line for line in text.rstrip("\n").splitlines())


def _log_detection_result(result: dict, where: str, name: str, report_path: str) -> None:
    """Logs a detection evaluation's per-class AP table (``result["table"]``) and its
    mAP line: on ``where`` (a split), of variant ``name``, written to ``report_path``."""
    from spp_jax.detection import report

    k = len(result["ap_voc07"])
    log.info(
        "average precision (%%) on %s:\n%s",
        where,
        _indented(report.ap_table(result["table"], k)),
    )
    log.info(
        "mAP %.4f (VOC07), %.4f (area): %s; report in %s",
        result["map_voc07"],
        result["map_area"],
        name,
        report_path,
    )


# Environment read once by TensorFlow's (and XLA's) C++ logging when the library loads:
# errors only, so no oneDNN / cpu_feature_guard notices and no absl pre-init banner.
_QUIET_NATIVE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Python loggers of libraries whose INFO and WARNING lines are start-up or progress
# chatter for a user of this command (absl carries orbax's and tfds's).
_QUIET_LOGGERS = ("absl", "tensorflow", "jax._src.xla_bridge")


def _setup_logging() -> None:
    """The command's output is spp_jax's own log lines (INFO and up) and other errors.

    Sets :data:`_QUIET_NATIVE_ENV` (values already in the environment win) before
    TensorFlow is imported, so it must run before any command imports spp_jax.data.
    Other libraries log errors only.
    """
    for key, value in _QUIET_NATIVE_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


# Lines TensorFlow's C++ code writes to stderr while it loads. TensorFlow 2.21 prints the
# oneDNN notice (and absl's banner before it) whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_LOAD_NOISE = re.compile(
    r"oneDNN custom operations are on|All log messages before absl::InitializeLog\(\)"
    r"|cpu_feature_guard|To enable the following instructions:.*rebuild TensorFlow"
)


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its start-up notices filtered out of stderr.

    The C++ loader writes to file descriptor 2, so that descriptor goes to a temporary
    file during the import; afterwards every line of it that is not one of
    :data:`_TF_LOAD_NOISE` is written to stderr (errors and warnings of the import
    itself are kept). Does nothing if TensorFlow is already imported or not installed.
    """
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not _TF_LOAD_NOISE.search(line):
                    print(line, file=sys.stderr)


def _views_arg(text: str) -> int:
    """``eval --views``: 1, 10 or 18 (:data:`spp_jax.multiview.VIEW_COUNTS`)."""
    accepted = (1, 10, 18)  # spp_jax.multiview.VIEW_COUNTS (not imported: it needs Flax)
    try:
        views = int(text)
    except ValueError:
        views = None
    if views not in accepted:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; use 1, 10 or 18 (the centre crop and full image; "
            "the 10-view test; the paper's 18 views)"
        )
    return views


def build_parser() -> argparse.ArgumentParser:
    """The ``spp-jax`` argument parser: one subcommand per job, each with its handler as
    ``func``."""
    from spp_jax import configs

    parser = argparse.ArgumentParser(prog="spp-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="pool inputs of several sizes into fixed-length vectors")
    d.add_argument("--levels", default="6,3,2,1", help="comma-separated bin counts")
    d.add_argument("--channels", type=int, default=256)

    t = sub.add_parser("train", help="train an SPP net (multi-size), checkpoint, evaluate")
    _add_config_arguments(t, "default", configs.available(), "model.width=0.5")
    t.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with auto-detection (TPU, SLURM)",
    )
    t.add_argument("--coordinator-address", help="host:port of process 0 (several hosts)")
    t.add_argument("--num-processes", type=int)
    t.add_argument("--process-id", type=int)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    e.add_argument("--workdir", required=True)
    e.add_argument(
        "--sizes",
        help="comma-separated test sizes (default: the config's; with --views 10 or 18, "
        "round(crop_size * resize_ratio))",
    )
    e.add_argument(
        "--views",
        type=_views_arg,
        default=1,
        help="1: centre crop and full image (the default); 10: centre + 4 corners and their "
        "flips; 18: also the 4 edge centres. 10 and 18 pool every view from conv5 computed "
        "once per image (SPP-net section 3.1.2); views have side size / resize_ratio",
    )
    e.add_argument(
        "--compare-whole-net",
        action="store_true",
        help="also run every view's crop through the whole network (the baseline) and "
        "report both accuracies and seconds per image; with --views 1, the centre view on "
        "the feature map against the centre crop",
    )
    x = sub.add_parser("extract", help="SPP features of images of any size to an .npz")
    x.add_argument("--workdir", required=True)
    x.add_argument("--images", required=True, help="an image folder or a TFDS dataset name")
    x.add_argument("--out", required=True, help="output .npz")
    x.add_argument("--size", type=int, help="short side in pixels (default: the crop size)")
    x.add_argument("--split", default="test", help="TFDS split (default: test)")
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument("--limit", type=int, help="at most this many images")
    _add_skip_bad_images_argument(x, "the output's 'skipped'")

    w = sub.add_parser(
        "import-weights",
        help="torchvision AlexNet / VGG-16 weights (.pth or .safetensors) as a workdir",
    )
    w.add_argument("--arch", required=True, choices=("alexnet", "vgg16"))
    w.add_argument("--weights", required=True, help="a .pth/.pt state_dict or a .safetensors")
    w.add_argument("--workdir", required=True, help="a new folder")
    w.add_argument(
        "--width", type=float, default=1.0, help="conv channel multiplier of the file's model"
    )

    handlers = {
        d: _demo_command,
        t: _train_command,
        e: _eval_command,
        x: _extract_command,
        w: _import_weights_command,
    }
    for sub_parser, handler in handlers.items():
        sub_parser.set_defaults(func=handler)
    _add_detection_commands(sub, configs.available("detection"))
    return parser


def _add_detection_commands(sub: Any, detection_configs: Sequence[str]) -> None:
    """``detect-train``, ``detect-eval`` and ``detect``."""
    dt = sub.add_parser(
        "detect-train",
        help="train an SPP-net object detector (every stage, resumable) and evaluate it",
    )
    _add_config_arguments(
        dt,
        "detection",
        detection_configs,
        "finetune.steps=500 or --set backbone_overrides.num_epochs=4",
    )
    de = sub.add_parser(
        "detect-eval", help="evaluate a detect-train workdir's detector on a split (AP table)"
    )
    de.add_argument("--workdir", required=True)
    _add_scales_argument(de)
    de.add_argument(
        "--split",
        default="test",
        help="test, validation or train: the run's split of that role (or a TFDS split name)",
    )
    de.add_argument(
        "--scorer", choices=("svm", "softmax"), help="window scores (default: the config's)"
    )
    de.add_argument("--no-bbox", action="store_true", help="without box regression")
    dd = sub.add_parser(
        "detect", help="detect objects in image files with a detect-train workdir's detector"
    )
    dd.add_argument("--workdir", required=True)
    dd.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files or folders"
    )
    dd.add_argument("--out", required=True, help="output folder (PNGs and detections.json)")
    _add_scales_argument(dd)
    dd.add_argument(
        "--min-score", type=float, help="drop detections scoring below (default: keep all)"
    )
    _add_skip_bad_images_argument(dd, "detections.json's 'skipped'")
    dt.set_defaults(func=_detect_train_command)
    de.set_defaults(func=_detect_eval_command)
    dd.set_defaults(func=_detect_command)


def _add_config_arguments(
    parser: argparse.ArgumentParser, default: str, names: Sequence[str], example: str
) -> None:
    """``--config`` (a shipped name in ``names``, or a ``.py`` path) and ``--set``."""
    parser.add_argument(
        "--config",
        default=default,
        help=f"a shipped config ({', '.join(names)}) or the path of a .py file with get_config()",
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _add_scales_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scales",
        type=int,
        choices=(1, 5),
        default=1,
        help="1: the single scale; 5: every scale of the config (default: 1)",
    )


def _add_skip_bad_images_argument(parser: argparse.ArgumentParser, listed_in: str) -> None:
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help=f"skip files that cannot be read as images (each with a warning; listed in "
        f"{listed_in}) instead of stopping at the first with an error naming it",
    )


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the subcommand; a user's mistake ends in one line,
    ``spp-jax CMD: error: ...``, with exit status 1 (``SPP_JAX_TRACEBACK=1``: the
    traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    if args.command is None:
        return _demo_command(args)
    if args.command != "demo":
        _import_tensorflow_quietly()  # they read data or decode images with TensorFlow
    from spp_jax.data import BadImageError

    prefix = f"spp-jax {args.command}: error:"
    try:
        return args.func(args)
    except BadImageError as err:  # one line naming the file
        log.error("%s (--skip-bad-images skips such files)", err)
        return 1
    except USER_ERRORS as err:
        if os.environ.get("SPP_JAX_TRACEBACK"):
            raise
        raise SystemExit(f"{prefix} {_one_line(err)}") from None
    except SystemExit as err:  # load_config's messages
        if isinstance(err.code, str) and not err.code.startswith(prefix):
            raise SystemExit(f"{prefix} {err.code}") from None
        raise


def _one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError's with its file name)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


#: Errors that a command's input causes (a path, a value, a full or read-only disk):
#: shown as one line naming it, without a traceback (``SPP_JAX_TRACEBACK=1`` shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _demo_command(args) -> int:
    levels = tuple(int(v) for v in getattr(args, "levels", "6,3,2,1").split(","))
    out = demo(levels, getattr(args, "channels", 256))
    if out["padded_max_abs_diff"] != 0.0:
        log.error("padded batch differs from per-size pooling")
        return 1
    log.info("ok")
    return 0


def _train_command(args) -> int:
    import spp_jax
    from spp_jax import train

    log.info("spp_jax %s from %s", spp_jax.__version__, os.path.dirname(spp_jax.__file__))
    config = load_config(args.config, args.set)
    _check_init_from_overrides(config, args.set, train.INIT_FROM_MODEL_FIELDS)
    _init_distributed(args)
    workdirs.check_run_dir(args.workdir, "classification")
    train.train_and_evaluate(config, args.workdir)
    return 0


def _check_init_from_overrides(config, overrides: list[str] | None, fields) -> None:
    """Refuses ``--set model.FIELD=...`` of a field that ``init_from``'s model sets
    (:data:`spp_jax.train.INIT_FROM_MODEL_FIELDS`), which the run would replace."""
    if not config.get("init_from"):
        return
    for item in overrides or []:
        key = item.partition("=")[0]
        group, _, field = key.partition(".")
        if group == "model" and field in fields:
            raise SystemExit(
                f"--set {item!r}: with init_from, model.{field} is the one in "
                f"{config.init_from}/config.json (the model its parameters fit); of the "
                "model's fields a run with init_from sets only model.dropout_rate and "
                "model.dtype (model.num_classes is its dataset's)"
            )


def _eval_command(args) -> int:
    from spp_jax import train

    workdirs.require(args.workdir, "classification")
    sizes = _sizes_arg(args.sizes) if args.sizes else None
    if args.views == 1 and not args.compare_whole_net:
        train.evaluate_single_view(args.workdir, sizes)
        return 0
    from spp_jax import multiview

    multiview.evaluate_multiview(
        args.workdir, sizes, views=args.views, compare_whole_net=args.compare_whole_net
    )
    return 0


def _extract_command(args) -> int:
    from spp_jax.extract import extract_features

    workdirs.require(args.workdir, "classification")
    workdirs.check_output_file(args.out)
    extract_features(
        args.workdir,
        args.images,
        args.out,
        size=args.size,
        batch_size=args.batch_size,
        split=args.split,
        limit=args.limit,
        on_bad_image="skip" if args.skip_bad_images else "raise",
    )
    return 0


def _import_weights_command(args) -> int:
    from spp_jax import pretrained

    workdirs.check_not_url(args.workdir)
    try:
        model, variables = pretrained.load(args.weights, args.arch, width=args.width)
    except ImportError as err:  # torch or safetensors missing: one line naming the extra
        raise ValueError(str(err)) from None
    pretrained.write_workdir(model, variables, args.workdir)
    log.info(
        "wrote %s: torchvision %s, %d classes; `spp-jax extract --workdir %s` reads it",
        args.workdir,
        args.arch,
        model.num_classes,
        args.workdir,
    )
    return 0


def _detect_train_command(args) -> int:
    from spp_jax.detection import pipeline

    config = load_config(args.config, args.set, kind="detection")
    workdirs.check_run_dir(args.workdir, "detection")
    metrics = pipeline.detect_train(config, args.workdir)
    report_path = os.path.join(args.workdir, "eval", "ap_table.md")
    _log_detection_result(metrics, "the test split", metrics["main"], report_path)
    return 0


def _detect_eval_command(args) -> int:
    from spp_jax.detection import pipeline

    workdirs.require(args.workdir, "detection")
    res = pipeline.evaluate_detector_workdir(
        args.workdir,
        scales=args.scales,
        split=args.split,
        scorer=args.scorer,
        regress=not args.no_bbox,
    )
    where = f"the {res['split']} split ({res['num_images']} images)"
    _log_detection_result(res, where, res["name"], res["report"])
    return 0


def _detect_command(args) -> int:
    from spp_jax.detection.files import detect_files

    workdirs.require(args.workdir, "detection")
    workdirs.check_output_dir(args.out)
    detect_files(
        args.workdir,
        args.images,
        args.out,
        scales=args.scales,
        min_score=args.min_score,
        on_bad_image="skip" if args.skip_bad_images else "raise",
    )
    return 0


def _sizes_arg(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(v <= 0 for v in sizes):
        raise ValueError(f"--sizes {text!r}: give comma-separated positive integers, e.g. 90,112")
    return sizes


if __name__ == "__main__":
    raise SystemExit(main())
