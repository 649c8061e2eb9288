"""Training and inference speed of spp_jax's networks against the same networks in PyTorch.

Run (8 minutes on 2 CPU cores, 49 rows; ``--quick``: about a minute)::

    pip install -e ".[bench]"
    python experiments/benchmarks/train_step.py --out results/train_step.json

For every network of :mod:`spp_jax.models` (ZF-5, Convnet*-5, Overfeat-5, Overfeat-7,
heads ``"spp"`` and ``"pool6"``) it builds the PyTorch twin (``torch_twin.py`` beside
this file: the same layers, channels_last, the weights of the Flax init copied over),
checks that the two have the same parameter count, the same map size after every
layer and the same logits (eval mode, a random batch, float32 agreement: at most
``torch_twin.LOGITS_RTOL`` relative; measured 0.7-3.4e-6), and stops with an error
otherwise. Then it times, in images per second:

* ``train``: one training step (forward with dropout, backward, AdamW update as
  ``spp_jax.train.create_optimizer`` builds it: weight decay on kernels only, the
  default config's learning rate and decay), spp_jax as one ``jax.jit`` of
  ``value_and_grad`` of ``spp_jax.train.cross_entropy`` and the optax update
  (single device, buffers donated, as the training loop's step without pmap), PyTorch
  eager (``zero_grad``, forward, ``cross_entropy``, ``backward``, ``AdamW.step``, the
  decay on weights only);
* ``infer``: the logits of a batch in eval mode (``jax.jit`` of ``apply``; PyTorch
  under ``torch.inference_mode``).

Rows (``DEFAULT_SIZES``; ``--archs``, ``--heads``, ``--widths``, ``--sizes``,
``--modes``, ``--no-detection`` and ``--quick`` choose fewer or others): every network
at the default config's width (0.25, fc 512, 10 classes; train batch 32, inference
batch 64) with the SPP head at 112, 90 (the default training sizes) and 224, with the
pool6 head at 112 and 224 (``base_size`` = the input size; ZF-5 and Convnet*-5 cannot
take 90 there: conv5 is 5 x 5); at full width (width 1, fc 4096; batches of 8 to keep
the run short) the SPP head at 224. Plus the detection path: the conv trunk (to
conv5) of full-width ZF-5 on one 500 x 375 image resized to a short side of 688
(688 x 917), inference, batch 1.

Timing: for each row both contenders are set up once, then measured ``--rounds``
times alternately (spp_jax, PyTorch, PyTorch, spp_jax, ...); each measurement is the
25th percentile of repeated calls (enough for ``--target-s`` seconds, at least 3, or
2 for calls over a second) after the compiling call and one more, and the best round
is kept for each contender alike (this machine's timings drift). The ratio is spp_jax
img/s / PyTorch img/s (above 1: spp_jax is faster). spp_jax's compile time is recorded
too. ``--compile`` also times ``torch.compile`` of the twin (skipped, with the error,
if it fails).

PyTorch runs on ``--threads`` threads (2); XLA uses every core (2 here). Another
process on the cores slows PyTorch's OpenMP threads far more than XLA's pool: the
load averages at the start and end are printed and saved; compare runs on an idle
machine. Without torch installed the script prints why and exits. Prints a table and
writes JSON with the versions, threads, CPU and load.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ARCH_NAMES = {
    "zf5": "ZF-5",
    "convnet5": "Convnet*-5",
    "overfeat5": "Overfeat-5",
    "overfeat7": "Overfeat-7",
}
# Input sizes per (width, head) unless --sizes: the default config's training sizes and
# the paper's 224; pool6 at the sizes its configs use (the nospp config's 112, and 224).
# Full width: SPP at 224 only, to keep the run short (its steps take seconds; pool6 has
# the same trunk): `--widths 1 --heads pool6 --sizes 224 112` times the rest.
DEFAULT_SIZES = {
    (0.25, "spp"): (112, 90, 224),
    (0.25, "pool6"): (112, 224),
    (1.0, "spp"): (224,),
    (1.0, "pool6"): (),
}
BATCH = {0.25: (32, 64), 1.0: (8, 8)}  # (train, infer) per width
FC_DIM = {0.25: 512, 1.0: 4096}
DETECTION_HW = (688, 917)  # a 500 x 375 image, short side resized to 688


def _load_twin():
    """``torch_twin.py`` beside this file (experiments/ is not an installed package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_twin.py")
    spec = importlib.util.spec_from_file_location("torch_twin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torch_twin", module)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One network at one input size; ``mode`` is ``"train"`` or ``"infer"``."""

    arch: str
    head: str  # "spp" | "pool6" | "trunk" (the detection path: conv5 only)
    width: float
    size: tuple[int, int]
    mode: str
    batch: int

    @property
    def label(self) -> str:
        name = ARCH_NAMES[self.arch]
        head = "conv5 only" if self.head == "trunk" else self.head
        h, w = self.size
        return f"{name} {head} w{self.width:g} {h}x{w} {self.mode} b{self.batch}"


def _pool6_fits(arch: str, size: int) -> bool:
    from spp_jax.models import pool6_window

    try:
        pool6_window(arch, size)
    except ValueError:
        return False
    return True


def make_rows(args) -> list[Row]:
    rows = []
    for width in args.widths:
        train_b, infer_b = BATCH.get(width, BATCH[1.0])
        for arch in args.archs:
            for head in args.heads:
                for size in args.sizes or DEFAULT_SIZES.get((width, head), (224,)):
                    if head == "pool6" and not _pool6_fits(arch, size):
                        continue
                    for mode in args.modes:
                        b = train_b if mode == "train" else infer_b
                        rows.append(Row(arch, head, width, (size, size), mode, b))
    if args.detection:
        rows.append(Row("zf5", "trunk", 1.0, DETECTION_HW, "infer", 1))
    return rows


# ------------------------------------------------------------------------ networks


def _config():
    from spp_jax.configs import default

    return default.get_config()


_CACHE: dict = {}  # the last network's init and twin, reused by its other rows


def _init(net, x: np.ndarray, key: tuple, seed: int) -> Any:
    """``net``'s Flax init, once per network (compiling it takes seconds; neither head's
    parameters depend on the input size)."""
    if _CACHE.get("params_key") != key:
        _CACHE.clear()
        _CACHE["params"] = jax.jit(net.init)(jax.random.key(seed), x[:1])["params"]
        _CACHE["params_key"] = key
    return _CACHE["params"]


def get_pair(row: Row, twin_lib, seed: int = 0) -> dict:
    """:func:`build_pair` for ``row``'s network and size, shared by its train and infer
    rows (checked once)."""
    key = (row.arch, row.head, row.width, row.size)
    if _CACHE.get("pair_key") != key:
        _CACHE.pop("pair", None)
        _CACHE["pair"] = build_pair(row, twin_lib, seed)
        _CACHE["pair_key"] = key
    return _CACHE["pair"]


def build_pair(row: Row, twin_lib, seed: int = 0) -> dict:
    """The spp_jax network, its params, the PyTorch twin and inputs, checked equal.

    The inputs hold the largest batch of the row's width; each row takes the first
    ``row.batch`` images.
    """
    import torch

    from spp_jax.models import ConvTrunk, SPPNet

    config = _config()
    h, w = row.size
    rng = np.random.default_rng(seed)
    batch = row.batch if row.head == "trunk" else max(BATCH.get(row.width, BATCH[1.0]))
    x = rng.standard_normal((batch, h, w, 3), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    t0 = time.perf_counter()
    if row.head == "trunk":
        net = ConvTrunk(row.arch, width=row.width)
        params = _init(net, x, (row.arch, row.head, row.width), seed)
        twin = twin_lib.torch_trunk(net.specs).to(memory_format=torch.channels_last)
        twin_lib.copy_weights(twin, params)
        check = twin_lib.check_trunk(net, params, twin, x[:1])
    else:
        net = SPPNet(
            arch=row.arch,
            num_classes=10,
            head=row.head,
            levels=tuple(config.model.levels),
            width=row.width,
            fc_dim=FC_DIM.get(row.width, 4096),
            dropout_rate=config.model.dropout_rate,
            base_size=h,
        )
        params = _init(net, x, (row.arch, row.head, row.width), seed)
        twin = twin_lib.torch_twin(net, params)
        check = twin_lib.check_twin(net, params, twin, x[:4])
    check["seconds"] = time.perf_counter() - t0
    return {"net": net, "params": params, "twin": twin, "x": x, "y": y, "check": check}


def jax_fns(row: Row, pair: dict) -> dict:
    """spp_jax's timed call (and its compile time)."""
    import optax

    from spp_jax.train import create_optimizer, cross_entropy

    net, x = pair["net"], jnp.asarray(pair["x"][: row.batch])
    if row.mode == "infer":
        if row.head == "trunk":
            fn = jax.jit(lambda p, x: net.apply({"params": p}, x)[0])
        else:
            fn = jax.jit(lambda p, x: net.apply({"params": p}, x))
        params = pair["params"]
        t0 = time.perf_counter()
        fn(params, x).block_until_ready()
        compile_s = time.perf_counter() - t0
        return {"call": lambda: fn(params, x).block_until_ready(), "compile_s": compile_s}

    config = _config()
    tx = create_optimizer(config, optax.constant_schedule(config.learning_rate))
    y = jnp.asarray(pair["y"][: row.batch])
    mask = jnp.ones(y.shape, jnp.float32)
    key = jax.random.key(1)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, step_no, x, y):
        dropout_key = jax.random.fold_in(key, step_no)

        def loss_fn(p):
            logits = net.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
            return cross_entropy(logits, y, mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree_util.tree_map(jnp.copy, pair["params"])
    state = {"params": params, "opt": tx.init(params), "n": 0}

    def call():
        p, o, loss = step(state["params"], state["opt"], jnp.int32(state["n"]), x, y)
        state.update(params=p, opt=o, n=state["n"] + 1)
        loss.block_until_ready()
        jax.block_until_ready(p)

    t0 = time.perf_counter()
    call()
    return {"call": call, "compile_s": time.perf_counter() - t0}


def torch_fns(row: Row, pair: dict, compiled: bool = False) -> dict:
    """PyTorch's timed call (eager, or ``torch.compile`` of the twin)."""
    import torch

    twin = pair["twin"]
    model = torch.compile(twin) if compiled else twin
    # An NCHW view of NHWC memory: channels_last.
    x = torch.from_numpy(np.ascontiguousarray(pair["x"][: row.batch])).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    if row.mode == "infer":
        twin.eval()

        def infer():
            with torch.inference_mode():
                return model(x)

        t0 = time.perf_counter()
        infer()
        return {"call": infer, "compile_s": time.perf_counter() - t0}

    config = _config()
    twin.train()
    decay = [m.weight for m in twin.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in twin.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest}],
        lr=config.learning_rate,
        weight_decay=0.0,
    )
    y = torch.from_numpy(pair["y"][: row.batch]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    step()
    return {"call": step, "compile_s": time.perf_counter() - t0}


# -------------------------------------------------------------------------- timing


def _calibrated(fns: dict) -> dict:
    """``fns`` (after its first, compiling call) with one more call's time."""
    t0 = time.perf_counter()
    fns["call"]()
    return dict(fns, per_call_s=time.perf_counter() - t0)


def measure(fns: dict, target_s: float, max_reps: int = 100) -> float:
    """Seconds per call: the 25th percentile of repeated calls, enough for about
    ``target_s`` seconds (at least 3; 2 for calls over a second)."""
    per_call = fns["per_call_s"]
    min_reps = 2 if per_call > 1 else 3
    reps = int(min(max_reps, max(min_reps, round(target_s / max(per_call, 1e-6)))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fns["call"]()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 25))


def bench_row(row: Row, twin_lib, args) -> dict:
    import torch

    t0 = time.perf_counter()
    pair = get_pair(row, twin_lib)
    result: dict[str, Any] = {
        "row": dataclasses.asdict(row),
        "label": row.label,
        "check": pair["check"],
    }
    contenders = {
        "spp_jax": _calibrated(jax_fns(row, pair)),
        "torch": _calibrated(torch_fns(row, pair)),
    }
    if args.compile:
        try:
            # A twin of its own: compiling must not change the eager twin's weights.
            cpair = dict(pair, twin=_clone_twin(pair, twin_lib))
            contenders["torch_compile"] = _calibrated(torch_fns(row, cpair, compiled=True))
        except Exception as e:
            result["torch_compile_error"] = f"{type(e).__name__}: {e}"[:500]
            torch._dynamo.reset()
    best: dict[str, float] = {}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            try:
                t = measure(contenders[name], args.target_s)
            except Exception as e:
                if name != "torch_compile":
                    raise
                result["torch_compile_error"] = f"{type(e).__name__}: {e}"[:500]
                names.remove(name)
                continue
            best[name] = min(t, best.get(name, t))
    for name, t in best.items():
        result[name] = {
            "s_per_step": t,
            "img_per_s": row.batch / t,
            "compile_s": contenders[name]["compile_s"],
        }
    result["ratio"] = best["torch"] / best["spp_jax"]
    result["row_s"] = time.perf_counter() - t0
    if "torch_compile" in best:
        result["ratio_vs_compile"] = best["torch_compile"] / best["spp_jax"]
    return result


def _clone_twin(pair: dict, twin_lib):
    import torch

    if pair["net"].__class__.__name__ == "ConvTrunk":
        twin = twin_lib.torch_trunk(pair["net"].specs).to(memory_format=torch.channels_last)
        twin_lib.copy_weights(twin, pair["params"])
        return twin
    return twin_lib.torch_twin(pair["net"], pair["params"])


# ---------------------------------------------------------------------------- main


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCH_NAMES), choices=list(ARCH_NAMES))
    parser.add_argument("--heads", nargs="+", default=["spp", "pool6"], choices=["spp", "pool6"])
    parser.add_argument("--widths", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=None, help="default: see DEFAULT_SIZES"
    )
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"]
    )
    parser.add_argument("--no-detection", dest="detection", action="store_false")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-s", type=float, default=0.4, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--quick", action="store_true", help="ZF-5 only, width 0.25, 112 px, 2 short rounds"
    )
    parser.add_argument("--out", default="results/train_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.archs, args.widths, args.sizes = ["zf5"], [0.25], [112]
        args.rounds, args.target_s, args.detection = 2, 0.3, False
    return args


def _fmt(r: dict, compile_col: bool) -> str:
    s = f"{r['label']:<44} | {r['spp_jax']['img_per_s']:9.1f} | {r['torch']['img_per_s']:9.1f}"
    s += f" | {r['ratio']:5.2f}"
    if compile_col:
        c = r.get("torch_compile")
        s += (
            f" | {c['img_per_s']:9.1f} | {r['ratio_vs_compile']:5.2f}"
            if c
            else " |       n/a |   n/a"
        )
    return s


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        import torch
    except ImportError:
        print("train_step.py: PyTorch is not installed (pip install -e '.[bench]'); skipped.")
        return 0
    torch.set_num_threads(args.threads)
    twin_lib = _load_twin()
    from spp_jax._cpu import native

    rows = make_rows(args)
    print(f"{len(rows)} rows, {args.rounds} rounds each; load {_load()}", flush=True)
    start = time.perf_counter()
    load_start = _load()
    results = []
    head = f"{'network, input, mode, batch':<44} | {'spp_jax':>9} | {'torch':>9} | ratio"
    if args.compile:
        head += f" | {'compiled':>9} | ratio"
    print(head + "   (img/s; ratio = spp_jax / torch)")
    print("-" * len(head))
    for row in rows:
        r = bench_row(row, twin_lib, args)
        results.append(r)
        print(_fmt(r, args.compile), flush=True)
        if "torch_compile_error" in r:
            print(f"    torch.compile skipped: {r['torch_compile_error'][:200]}")
    wall = time.perf_counter() - start
    ratios = [r["ratio"] for r in results]
    print(
        f"\n{len(results)} rows in {wall:.0f} s; ratio min {min(ratios):.2f}, "
        f"max {max(ratios):.2f}; rows below 1: {sum(q < 1 for q in ratios)}; load {_load()}"
    )
    checks = [r["check"]["rel_diff"] for r in results]
    print(f"twins checked: logits relative difference at most {max(checks):.2g}")
    import flax
    import optax

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backend": jax.default_backend(),
        "cpu_kernels": native.usable(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_start": load_start,
        "load_end": _load(),
        "wall_s": wall,
        "args": vars(args),
        "logits_rtol": twin_lib.LOGITS_RTOL,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
