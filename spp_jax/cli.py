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

import jax
import jax.numpy as jnp
import numpy as np

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


def load_config(name_or_path: str, overrides: list[str] | None = None):
    """Loads a config and applies ``--set`` overrides.

    Args:
      name_or_path: the name of a shipped config (:func:`spp_jax.configs.available`:
        ``default``, ``tiny``, ...), found from any directory, or the path of a ``.py``
        file with a ``get_config()`` of its own (which may start from
        ``spp_jax.configs.default.get_config()``).
      overrides: ``key=value`` items with dotted keys (``model.width=0.5``); a value is
        parsed as a Python literal when it is one (``0.5``, ``(112, 90)``, ``None``).

    Returns:
      The ``ml_collections.ConfigDict``.

    Raises:
      SystemExit: an unknown name, a missing file, a file without ``get_config()``, or
        an override of a key the config does not have; the message names it.
    """
    import ast
    from pathlib import Path

    from spp_jax import configs

    names = configs.available()
    path = Path(name_or_path)
    if name_or_path in names:
        config = configs.get_config(name_or_path)
    elif path.suffix == ".py" and path.is_file():
        spec = importlib.util.spec_from_file_location(f"spp_config_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot import config file {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise SystemExit(f"config file {path} has no get_config() function")
        config = module.get_config()
    else:
        raise SystemExit(
            f"config {name_or_path!r} not found; give one of {list(names)} or the path of a "
            ".py file with get_config()"
        )
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node or not hasattr(node[part], "keys"):
                raise SystemExit(
                    f"--set {item!r}: no group {part!r} in the config; keys: {sorted(node.keys())}"
                )
            node = node[part]
        if leaf not in node:
            raise SystemExit(
                f"--set {item!r}: no key {key!r} in the config; keys: {sorted(node.keys())}"
            )
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)
        with config.unlocked():
            node[leaf] = value
    return config


def _init_distributed(args) -> None:
    """``jax.distributed.initialize`` from flags, environment, or auto-detection."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = args.num_processes or int(os.environ["JAX_NUM_PROCESSES"])
        pid = args.process_id if args.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
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


def main(argv: list[str] | None = None) -> int:
    from spp_jax import configs

    parser = argparse.ArgumentParser(prog="spp-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="pool inputs of several sizes into fixed-length vectors")
    d.add_argument("--levels", default="6,3,2,1", help="comma-separated bin counts")
    d.add_argument("--channels", type=int, default=256)

    t = sub.add_parser("train", help="train an SPP net (multi-size), checkpoint, evaluate")
    t.add_argument(
        "--config",
        default="default",
        help=f"a shipped config ({', '.join(configs.available())}) or the path of a .py file "
        "with get_config()",
    )
    t.add_argument("--workdir", required=True)
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.width=0.5 (repeatable)",
    )
    for p in (t,):
        p.add_argument(
            "--distributed",
            action="store_true",
            help="jax.distributed.initialize() with auto-detection (TPU, SLURM)",
        )
        p.add_argument("--coordinator-address", help="host:port of process 0 (several hosts)")
        p.add_argument("--num-processes", type=int)
        p.add_argument("--process-id", type=int)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    e.add_argument("--workdir", required=True)
    e.add_argument("--sizes", help="comma-separated test sizes (default: the config's)")
    x = sub.add_parser("extract", help="SPP features of images of any size to an .npz")
    x.add_argument("--workdir", required=True)
    x.add_argument("--images", required=True, help="an image folder or a TFDS dataset name")
    x.add_argument("--out", required=True, help="output .npz")
    x.add_argument("--size", type=int, help="short side in pixels (default: the crop size)")
    x.add_argument("--split", default="test", help="TFDS split (default: test)")
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument("--limit", type=int, help="at most this many images")
    x.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip files that cannot be read as images (each with a warning; listed in the "
        "output's 'skipped') instead of stopping at the first with an error naming it",
    )
    args = parser.parse_args(argv)
    _setup_logging()
    if args.command in ("train", "eval", "extract"):  # they read data with tf.data
        _import_tensorflow_quietly()
    if args.command == "train":
        import spp_jax
        from spp_jax import train

        log.info("spp_jax %s from %s", spp_jax.__version__, os.path.dirname(spp_jax.__file__))
        config = load_config(args.config, args.set)
        _init_distributed(args)
        train.train_and_evaluate(config, args.workdir)
        return 0
    if args.command == "eval":
        from spp_jax import train

        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        train.evaluate_workdir(args.workdir, sizes)
        return 0
    if args.command == "extract":
        from spp_jax.data import BadImageError
        from spp_jax.extract import extract_features

        try:
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
        except BadImageError as e:  # one line naming the file, no traceback
            log.error("%s (--skip-bad-images skips such files)", e)
            return 1
        return 0
    if args.command in (None, "demo"):
        levels = tuple(int(v) for v in getattr(args, "levels", "6,3,2,1").split(","))
        out = demo(levels, getattr(args, "channels", 256))
        if out["padded_max_abs_diff"] != 0.0:
            log.error("padded batch differs from per-size pooling")
            return 1
        log.info("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
