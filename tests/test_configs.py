"""The shipped configs: optimisers and schedules as documented, and a wheel that runs them.

Every config's optimizer and learning-rate schedule are built by the real code in
:mod:`spp_jax.train` and compared with a NumPy model of the rules its keys document
(``optimizer``, ``learning_rate``, ``warmup_epochs``, ``lr_schedule``, ...), fed that
config's values, over a realistic number of steps per epoch for its dataset; each
config's docstring names its optimiser and learning rate. The last test builds the
wheel, installs it into a fresh virtual environment outside the source tree and runs
``spp-jax train --config tiny`` there from another directory.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("ml_collections")

import jax
import jax.numpy as jnp
import optax

import spp_jax
from spp_jax import cli, configs, workdirs
from spp_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINING_CONFIGS = configs.available()

# ImageNet 2012's train split (Russakovsky et al. 2015); never downloaded here, so its size
# is the one dataset fact this file states rather than reads from a builder.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def _steps_per_epoch(config) -> int:
    """A realistic count for ``config``: its dataset's train examples over its batch size."""
    if config.dataset == "imagenet2012":
        examples = IMAGENET_TRAIN_EXAMPLES
    else:
        from spp_jax.datasets.spp_shapes import SppShapes

        name, _, size = config.dataset.partition("/")
        assert name == "spp_shapes", config.dataset
        sizes = {c.name: c.num_train for c in SppShapes.BUILDER_CONFIGS}
        examples = sizes[size or SppShapes.DEFAULT_BUILDER_CONFIG_NAME]
    return examples // config.batch_size


def _flat_keys(config) -> set[str]:
    out = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            out |= {f"{key}.{k}" for k in _flat_keys(value)}
        else:
            out.add(key)
    return out


def test_every_config_derives_from_default():
    names = configs.available()
    keys = _flat_keys(configs.get_config("default"))
    for name in names:
        assert _flat_keys(configs.get_config(name)) == keys, name
    with pytest.raises(ValueError, match=r"'nope'.*'default'.*'zf5_imagenet'"):
        configs.get_config("nope")


def _expected_lr(config, steps_per_epoch: int, step: int) -> float:
    """The learning rate at ``step`` by the rules the config keys document (default.py)."""
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    lr = config.learning_rate
    if step < warmup:
        return lr * step / warmup
    if config.lr_schedule == "cosine":
        t = min(step - warmup, total - warmup) / (total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    assert config.lr_schedule == "step", config.lr_schedule
    return lr * 0.1 ** sum(step >= f * total for f in config.lr_boundaries)


def _probe_steps(config, steps_per_epoch: int) -> list[int]:
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    steps = {0, 1, warmup // 2, warmup, warmup + 1, (warmup + total) // 2, total - 1, total}
    if config.lr_schedule == "step":
        for fraction in config.lr_boundaries:
            b = int(fraction * total)
            steps |= {b - 1, b, b + 1}
    steps |= set(np.linspace(0, total, 23).astype(int).tolist())
    return sorted(steps)


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_learning_rate_schedule_follows_the_config(name):
    config = configs.get_config(name)
    spe = _steps_per_epoch(config)
    schedule = train_lib.learning_rate_schedule(config, spe)
    steps = _probe_steps(config, spe)
    got = np.array([float(schedule(jnp.asarray(s))) for s in steps])
    want = np.array([_expected_lr(config, spe, s) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9, err_msg=f"{name} at {steps}")
    # Under jit too, as in train_step.
    jitted = jax.jit(schedule)(jnp.asarray(steps[-2]))
    np.testing.assert_allclose(float(jitted), want[-2], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_docstring_names_the_optimizer_and_learning_rate(name):
    config = configs.get_config(name)
    doc = importlib.import_module(f"spp_jax.configs.{name}").__doc__
    assert {"sgd": "SGD", "adamw": "AdamW"}[config.optimizer] in doc, name
    assert f"{config.learning_rate:g}" in doc, name


def test_zf5_imagenet_lr_is_divided_by_ten_twice():
    """The issue's case: the docstring's schedule, not the inherited cosine."""
    config = configs.get_config("zf5_imagenet")
    spe = _steps_per_epoch(config)
    total = 70 * spe
    schedule = train_lib.learning_rate_schedule(config, spe)
    lrs = {float(schedule(s)) for s in range(0, total, 997)}
    np.testing.assert_allclose(sorted(lrs), [1e-4, 1e-3, 1e-2], rtol=1e-6)
    assert float(schedule(total // 2 - 1)) == pytest.approx(0.01)
    assert float(schedule(total // 2)) == pytest.approx(0.001)
    assert float(schedule(int(0.8 * total) - 1)) == pytest.approx(0.001)
    assert float(schedule(int(0.8 * total))) == pytest.approx(0.0001)


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "conv1": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        },
        "fc8": {
            "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
    }


def _expected_updates(config, steps_per_epoch: int, params: dict, grads: list[dict]) -> list[dict]:
    """The documented update rules in NumPy: SGD with momentum or AdamW (optax's b1, b2,
    eps); weight decay on kernels only."""
    wd = config.weight_decay
    flat_p = {(m, k): np.asarray(v, np.float64) for m, d in params.items() for k, v in d.items()}
    state = {key: (np.zeros_like(p), np.zeros_like(p)) for key, p in flat_p.items()}
    out = []
    for t, g in enumerate(grads):
        lr = _expected_lr(config, steps_per_epoch, t)
        upd = {}
        for key, p in flat_p.items():
            gk = np.asarray(g[key[0]][key[1]], np.float64)
            decay = wd * p if key[1] == "kernel" else 0.0
            a, b = state[key]
            if config.optimizer == "sgd":
                a = gk + decay + config.momentum * a
                upd[key] = -lr * a
            else:
                a = 0.9 * a + 0.1 * gk
                b = 0.999 * b + 0.001 * gk * gk
                a_hat, b_hat = a / (1 - 0.9 ** (t + 1)), b / (1 - 0.999 ** (t + 1))
                upd[key] = -lr * (a_hat / (np.sqrt(b_hat) + 1e-8) + decay)
            state[key] = (a, b)
        out.append(upd)
    return out


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_optimizer_follows_the_config(name):
    config = configs.get_config(name)
    spe = _steps_per_epoch(config)
    schedule = train_lib.learning_rate_schedule(config, spe)
    tx = train_lib.create_optimizer(config, schedule)
    params = _toy_params()
    rng = np.random.default_rng(1)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(4)
    ]
    opt_state = tx.init(params)
    got = []
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, params)
        got.append(updates)
    want = _expected_updates(config, spe, params, grads)
    for t, (u, w) in enumerate(zip(got, want, strict=True)):
        for (m, k), value in w.items():
            np.testing.assert_allclose(
                np.asarray(u[m][k]), value, rtol=2e-5, atol=1e-9, err_msg=f"{name} step {t} {m}/{k}"
            )
    assert isinstance(tx, optax.GradientTransformation)


def test_a_users_config_file_can_start_from_default(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from spp_jax.configs import default\n\n\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    c.num_epochs = 3\n"
        "    c.model.width = 0.5\n"
        "    return c\n"
    )
    config = cli.load_config(str(path), ["learning_rate=0.5"])
    assert (config.num_epochs, config.model.width, config.learning_rate) == (3, 0.5, 0.5)
    assert config.crop_size == configs.get_config("default").crop_size
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match=r"empty\.py has no get_config"):
        cli.load_config(str(tmp_path / "empty.py"))
    with pytest.raises(SystemExit, match=r"config '.*missing\.py' not found.*'tiny'"):
        cli.load_config(str(tmp_path / "missing.py"))


def test_read_config_of_a_workdir_fills_missing_keys_from_default(tmp_path):
    saved = json.loads(configs.get_config("tiny").to_json_best_effort())
    del saved["full_image_bucket_steps"], saved["model"]["dtype"], saved["model"]["num_classes"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = workdirs.read_config(str(tmp_path))
    default = configs.get_config("default")
    assert config.full_image_bucket_steps == default.full_image_bucket_steps
    assert config.model.dtype == default.model.dtype
    assert config.model.num_classes is None  # load_trained reads it from the checkpoint
    assert config.crop_size == 48 and config.train_sizes == (48, 40)


# ------------------------------------------------------------------ the installed wheel

_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".ci-venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "runs",
    "results",
    ".whl",
    ".gl",
)


def test_wheel_in_a_fresh_venv_trains_the_tiny_config_from_another_directory(tmp_path):
    """``pip install`` of the wheel (not editable), then ``spp-jax train --config tiny``.

    The fresh venv sees this environment's site-packages through a ``.pth`` path line
    (jax, flax and TensorFlow are not downloaded again). Such a directory is added to
    ``sys.path`` after the venv's own site-packages, and its ``.pth`` files (this
    checkout's editable install) are not processed, so ``spp_jax`` comes from the wheel.
    """
    pytest.importorskip("tensorflow_datasets")
    # Built without build isolation, by this environment's setuptools (which before 70.1
    # needs the wheel package for bdist_wheel).
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")
    # A copy of the source: the build writes build/ and *.egg-info, and a stale build/
    # in the checkout could ship files that no longer exist.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("spp_jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "parent_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    where = subprocess.run(
        [str(python), "-c", "import spp_jax, spp_jax.configs; print(spp_jax.__file__)"],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where == os.path.join(site, "spp_jax", "__init__.py"), where

    workdir = tmp_path / "run"
    run = subprocess.run(
        [str(venv / "bin" / "spp-jax"), "train", "--config", "tiny", "--workdir", str(workdir)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    # The run itself logs where spp_jax came from: the wheel, not this checkout.
    expect = f"spp_jax {spp_jax.__version__} from {os.path.join(site, 'spp_jax')}"
    assert expect in run.stderr, run.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in records if "epoch" in r)
    assert set(records[-1]["final"]) == {"40", "48"}
    assert os.path.isdir(workdir / "checkpoints" / "10")
    assert not (cwd / "experiments").exists() and not list(cwd.iterdir())
