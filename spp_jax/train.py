"""Multi-size SPP-net training with ``jax.pmap``, TFDS input and orbax checkpoints.

Shaped like the Flax ImageNet example: small typed functions, a pure
``train_step(state, batch) -> (state, metrics)`` and ``train_and_evaluate(config,
workdir)``. The config is an ``ml_collections.ConfigDict`` (``spp_jax/configs/default.py``
holds every key, its meaning and its default). Each epoch has one input size
(:func:`spp_jax.data.train_size_for_epoch`) and so one static batch shape: the pmapped
step compiles once per size. The data order, crops, size schedule and dropout keys are
functions of ``(seed, epoch, step)``, so a run killed and resumed from its last
(atomic) checkpoint ends with the same parameters as an uninterrupted run. A run writes
``config.json``, ``checkpoints/`` and (:mod:`spp_jax.metrics`) ``metrics.jsonl``,
TensorBoard event files and ``curves.png`` under ``workdir``. Devices and hosts:
``docs/scale_out.md``.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from spp_jax import configs, workdirs
from spp_jax import data as data_lib
from spp_jax import metrics as metrics_lib
from spp_jax._io import atomic_write_text
from spp_jax.models import SPPNet

log = logging.getLogger("spp_jax.train")

AXIS = "batch"


class TrainState(train_state.TrainState):
    """Flax TrainState plus the base key that dropout keys are folded from."""

    dropout_key: jax.Array


# --------------------------------------------------------------------------- building


def create_model(config) -> SPPNet:
    """The :class:`spp_jax.models.SPPNet` that ``config.model`` describes.

    Raises:
      ValueError: ``config.model.num_classes`` is not set (:func:`with_num_classes`
        sets it to the dataset's class count).
    """
    m = config.model
    if m.get("num_classes") is None:
        raise ValueError(
            "config.model.num_classes is None; give the class count, a positive int "
            "(with_num_classes(config, info.num_classes) sets the dataset's)"
        )
    return SPPNet(
        arch=m.arch,
        num_classes=m.num_classes,
        head=m.head,
        levels=tuple(m.levels),
        width=m.width,
        depth=m.depth,
        fc_dim=m.fc_dim,
        dropout_rate=m.dropout_rate,
        base_size=m.base_size,
        dtype=jnp.dtype(m.dtype),
        center_input=m.get("center_input", False),  # a config of your own may leave it out
        spp_mode=m.get("spp_mode", "max"),
        channel_major=m.get("channel_major", False),
        pool5=None if m.get("pool5") is None else tuple(m.pool5),
    )


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """``"step"`` (the paper: divide by 10 at each of ``lr_boundaries``, fractions of
    the run) or ``"cosine"``, both after ``warmup_epochs`` of linear warm-up."""
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    lr = config.learning_rate
    if config.lr_schedule == "step":
        bounds = {int(f * total): 0.1 for f in config.lr_boundaries}
        main = optax.piecewise_constant_schedule(lr, bounds)
        main = _shifted(main, warmup)
    elif config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
    else:
        raise ValueError(f"lr_schedule {config.lr_schedule!r} not accepted; use 'step' or 'cosine'")
    if warmup > 0:
        main = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    # optax's schedules mix the int32 step with Python floats, which strict dtype
    # promotion (jax_numpy_dtype_promotion="strict") rejects: hand them a float step
    # (exact up to 2**24 steps).
    return lambda step: main(jnp.asarray(step, jnp.float32))


def _shifted(schedule: optax.Schedule, offset: int) -> optax.Schedule:
    # join_schedules hands the later schedule (step - boundary); piecewise bounds are
    # fractions of the whole run, so add the offset back.
    return lambda step: schedule(step + offset)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum (the paper) or AdamW; weight decay on kernels only."""

    def kernels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", "") == "kernel", params
        )

    if config.optimizer == "sgd":
        return _standard_promotion(
            optax.chain(
                optax.add_decayed_weights(config.weight_decay, mask=kernels),
                optax.sgd(schedule, momentum=config.momentum, nesterov=False),
            )
        )
    if config.optimizer == "adamw":
        return _standard_promotion(
            optax.adamw(schedule, weight_decay=config.weight_decay, mask=kernels)
        )
    raise ValueError(f"optimizer {config.optimizer!r} not accepted; use 'sgd' or 'adamw'")


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` run under JAX's standard dtype promotion: optax mixes its int32 step
    count with Python floats (AdamW's bias correction), which a user's
    ``jax_numpy_dtype_promotion="strict"`` would reject."""

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def create_train_state(
    config, model: SPPNet, image_size: int, tx: optax.GradientTransformation
) -> TrainState:
    """Initial state (unreplicated), identical on every process for a given seed."""
    key = jax.random.key(config.seed)
    init_key, dropout_key = jax.random.split(key)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(init_key, x)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        dropout_key=jax.random.key_data(dropout_key),
    )
    # A strongly typed step: a weakly typed 0 would make the second step retrace.
    return state.replace(step=jnp.array(0, jnp.int32))


# ------------------------------------------------------------------------ the steps


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean softmax cross-entropy (float32)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, learning_rate_fn: optax.Schedule
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on this device's share of the global batch.

    Gradients and metrics are averaged over the mapped axis ``"batch"`` (every
    device holds the same number of examples, so this is the global mean).
    Dropout keys: ``fold_in(fold_in(dropout_key, step), device index)``.

    Args:
      state: replicated :class:`TrainState`.
      batch: ``image (b, H, W, 3)``, ``label (b,)``, ``mask (b,)``.
      learning_rate_fn: for the ``lr`` metric.
    """
    key = jax.random.wrap_key_data(state.dropout_key)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params}, batch["image"], train=True, rngs={"dropout": key}
        )
        return cross_entropy(logits, batch["label"], batch["mask"]), logits

    # Under shard_map, parameters replicated with P() are invariant over the axis, and
    # the gradient with respect to an invariant value comes back already summed over it
    # (pmean would then leave n_devices times pmap's mean). Differentiating with respect
    # to a varying copy gives each device its own gradient, as under pmap.
    params = _varying(state.params, AXIS)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.lax.pmean(grads, AXIS)
    state = state.apply_gradients(grads=grads)
    hit = (jnp.argmax(logits, -1) == batch["label"]).astype(batch["mask"].dtype)
    correct = jnp.sum(hit * batch["mask"])
    metrics = {
        "loss": jax.lax.pmean(loss, AXIS),
        "accuracy": jax.lax.psum(correct, AXIS) / jax.lax.psum(jnp.sum(batch["mask"]), AXIS),
        "lr": learning_rate_fn(state.step - 1),
    }
    return state, metrics


def _varying(tree: Any, axis: str) -> Any:
    """``tree`` typed as varying over the mapped ``axis`` (a no-op on older JAX)."""
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(tree, axis, to="varying")
    pvary = getattr(jax.lax, "pvary", None)
    return pvary(tree, axis) if pvary is not None else tree


def eval_step(params: Any, batch: dict[str, jax.Array], *, apply_fn: Callable) -> dict:
    """Sums of loss, top-1 and top-5 hits and examples over the ``"batch"`` axis.

    ``valid_sizes`` in the batch (full-image buckets) goes to the SPP layer, so the
    padding never reaches the pooled features.
    """
    logits = apply_fn(
        {"params": params}, batch["image"], train=False, valid_sizes=batch.get("valid_sizes")
    ).astype(jnp.float32)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    in_top5 = jnp.any(topk == batch["label"][:, None], axis=-1)
    sums = {
        "loss": jnp.sum(losses * mask),
        "top1": jnp.sum((topk[:, 0] == batch["label"]).astype(mask.dtype) * mask),
        "top5": jnp.sum(in_top5.astype(mask.dtype) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, AXIS)


# -------------------------------------------------------------------- host utilities


def shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``(local_batch, ...)`` -> ``(local_devices, local_batch / local_devices, ...)``."""
    n = jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)


def replicate(tree):
    """Copies ``tree`` to every local device, laid out as pmap's own outputs are.

    ``jax_utils.replicate`` gives arrays of another sharding than the step returns,
    so the second step would compile again; one pass through a pmapped identity
    gives them the step's own layout.
    """
    return jax.pmap(lambda x: x, axis_name=AXIS)(jax_utils.replicate(tree))


def unreplicate_to_host(tree):
    """The first local replica of a pmapped pytree, as host NumPy arrays.

    Reads this process's first device buffer directly. Indexing (``x[0]``) would be
    a computation over the global array, i.e. over every process's devices, and with
    several processes such eager computations can deadlock when the processes issue
    them at different moments.
    """

    def first(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)[0]
        return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])

    return jax.tree_util.tree_map(first, tree)


def checkpoint_manager(workdir: str, keep: int = 3):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        ),
    )


def save_checkpoint(manager, state: TrainState) -> None:
    """Saves the (host, unreplicated) state; atomic (temporary dir, then rename).

    Raises:
      OSError: the file system is full (checked before writing, from the state's size)
        or read-only; the message says which checkpoint is kept. A crash or a failed
        save never touches the checkpoints already written.
    """
    import orbax.checkpoint as ocp

    step = int(state.step)
    savable = _savable(state)
    directory = str(manager.directory)
    kept = f"the last saved checkpoint (step {manager.latest_step()}) is kept"
    need = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(savable))
    free = shutil.disk_usage(directory).free
    if free < need + _SAVE_MARGIN_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"no space left for checkpoint step {step} in {directory}: it needs about "
            f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {kept}",
        )
    try:
        manager.save(step, args=ocp.args.StandardSave(savable))
        manager.wait_until_finished()
    except Exception as e:
        text = str(e)
        for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            if os.strerror(code) in text:
                raise OSError(
                    code,
                    f"could not save checkpoint step {step} in {directory}: "
                    f"{os.strerror(code)}; {kept}",
                ) from None
        raise
    log.info("saved checkpoint at step %d", step)


#: Room beyond the arrays' bytes that a checkpoint needs (OCDBT's index and metadata).
_SAVE_MARGIN_BYTES = 256 * 1024


def _savable(state: TrainState) -> dict:
    return {
        "step": np.asarray(state.step),
        "params": state.params,
        "opt_state": state.opt_state,
        "dropout_key": np.asarray(state.dropout_key),
    }


def restore_checkpoint(manager, state: TrainState, step: int | None = None) -> TrainState:
    """``state`` with the arrays of checkpoint ``step`` (default: the latest)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    target = jax.tree_util.tree_map(np.asarray, _savable(state))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    _check_restored_shapes(target, restored, f"{manager.directory}/{step}")
    return state.replace(
        step=jnp.array(restored["step"], jnp.int32),
        params=restored["params"],
        opt_state=restored["opt_state"],
        dropout_key=restored["dropout_key"],
    )


def _check_restored_shapes(target, restored, where: str) -> None:
    """Raises a one-line :class:`spp_jax.workdirs.WorkdirError` naming the first array
    whose saved shape differs from the model's: a checkpoint of another architecture
    (or a ``config.json`` edited after training) restores without complaint otherwise,
    and fails later deep inside the network."""
    want = flax.traverse_util.flatten_dict(target["params"], sep="/")
    got = flax.traverse_util.flatten_dict(restored["params"], sep="/")
    for key in sorted(set(want) | set(got)):
        w, g = want.get(key), got.get(key)
        if w is None or g is None or np.shape(w) != np.shape(g):
            saved = "absent" if g is None else f"shape {tuple(np.shape(g))}"
            expected = "no such parameter" if w is None else f"shape {tuple(np.shape(w))}"
            raise workdirs.WorkdirError(
                f"checkpoint {where} does not fit the model its workdir's config.json "
                f"describes: parameter {key} is {saved} there, the model expects {expected} "
                "(a checkpoint of another architecture?)"
            )


def load_dataset(config) -> tuple[Any, data_lib.DatasetInfo]:
    """The TFDS builder and :class:`spp_jax.data.DatasetInfo` that ``config`` names."""
    builder = data_lib.get_builder(config.dataset, config.data_dir)
    info = data_lib.dataset_info(
        builder,
        image_key=config.image_key,
        label_key=config.label_key,
        splits=(config.train_split, config.eval_split),
    )
    return builder, info


def with_num_classes(config, num_classes: int):
    """A copy of ``config`` whose ``model.num_classes`` is the dataset's ``num_classes``.

    Raises:
      ValueError: ``config.model.num_classes`` is set to another count.
    """
    given = config.model.get("num_classes")
    if given is not None and given != num_classes:
        raise ValueError(
            f"config.model.num_classes is {given}, but dataset {config.dataset!r} has "
            f"{num_classes} classes; set it to {num_classes} or None"
        )
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.num_classes = num_classes
    return config


def save_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        atomic_write_text(path, config.to_json_best_effort(indent=2))


# --------------------------------------------------------------------------- training


def _progress(iterable: Iterable, total: int, desc: str):
    if jax.process_index() != 0:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0, disable=None)


def train_and_evaluate(config, workdir: str, *, stop_after_step: int | None = None) -> dict:
    """Trains, checkpoints and evaluates; resumes from ``workdir`` if it has a checkpoint.

    Args:
      config: ``ml_collections.ConfigDict`` (see ``spp_jax/configs/default.py``).
      workdir: output directory, created if needed.
      stop_after_step: stop (after checkpointing) once this many steps are done,
        as if the run were killed there; for resume tests.

    Returns:
      A dict: ``"state"`` (the host ``TrainState``), ``"eval"`` (the final evaluation
      dict, or None) and ``"train_compiles"`` (the shapes the train step was compiled for).
    """
    configs.check(config)
    workdirs.check_run_dir(workdir, "classification")
    _check_batch_sizes(config)
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    resuming = manager.latest_step() is not None
    config, init_from = _with_init_from_model(config, workdir, resuming=resuming)
    builder, info = load_dataset(config)
    config = with_num_classes(config, info.num_classes)
    save_config(config, workdir)
    steps_per_epoch = data_lib.steps_per_epoch(info, config.train_split, config.batch_size)
    _log_run(config, info, steps_per_epoch)

    model = create_model(config)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    state = _initial_state(config, model, schedule, manager, init_from=init_from)
    start_step = int(state.step)
    p_train_step = _PmappedTrainStep(schedule)
    p_state = replicate(state)
    writer = metrics_lib.MetricsWriter(workdir)
    writer.truncate(start_step)  # what a killed run wrote after its last checkpoint
    step = start_step
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
        size = data_lib.train_size_for_epoch(
            config.train_sizes, config.size_schedule, epoch, config.seed
        )
        skip = step - epoch * steps_per_epoch
        batches = _epoch_batches(config, builder, info, epoch=epoch, size=size, skip=skip)
        t0 = time.perf_counter()
        # Metrics stay on the device until the epoch's log line: reading them back
        # after every step would stop an accelerator from queuing the next step.
        step_metrics = []
        desc = f"epoch {epoch + 1}/{config.num_epochs} size {size}"
        for batch in _progress(batches, steps_per_epoch - skip, desc):
            p_state, metrics = p_train_step(p_state, shard(batch))
            step_metrics.append(metrics)
            step += 1
            if _checkpoint_due(config, step) or step == stop_after_step:
                save_checkpoint(manager, unreplicate_to_host(p_state))
            if step == stop_after_step:
                log.info("stopping after step %d as asked", step)
                writer.close()
                return {
                    "state": unreplicate_to_host(p_state),
                    "eval": None,
                    "train_compiles": p_train_step.compiles,
                }
        if not step_metrics:
            continue
        compiles = len(p_train_step.compiles)
        record = _epoch_record(
            step_metrics, epoch=epoch, step=step, size=size, started=t0, compiles=compiles
        )
        if config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0:
            ev = evaluate(
                config, builder, info, p_state.params, model, mode="center", size=config.crop_size
            )
            record.update({f"test_{k}": v for k, v in ev.items()})
        # The record before the checkpoint: a run killed between the two resumes from
        # the previous checkpoint, and the writer drops the record it then writes again.
        writer.write(record, step)
        if step % steps_per_epoch == 0 and not _checkpoint_due(config, step):
            save_checkpoint(manager, unreplicate_to_host(p_state))
        _log_epoch(config, record)

    host_state = unreplicate_to_host(p_state)
    final = None
    if config.final_eval:
        final = final_evaluation(config, builder, info, p_state.params, model)
        writer.write({"final": final, "metrics": flat_metrics(final)}, step)
        log.info("final test accuracy (top-1):\n%s", format_final(final))
    writer.close()  # the event file; metrics.jsonl is closed after each line
    _plot_curves(workdir)
    return {"state": host_state, "eval": final, "train_compiles": p_train_step.compiles}


def _check_batch_sizes(config) -> None:
    """Raises a ValueError unless both batch sizes split evenly over all devices."""
    n_dev = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n_dev:
            raise ValueError(
                f"{key} {config[key]} is not divisible by the {n_dev} devices; "
                f"use a multiple of {n_dev}"
            )


def _log_run(config, info: data_lib.DatasetInfo, steps_per_epoch: int) -> None:
    log.info(
        "dataset %s: %d classes, %s examples; %d process(es) x %d device(s), global batch %d, "
        "%d steps/epoch, %d epochs",
        info.name,
        info.num_classes,
        info.num_examples,
        jax.process_count(),
        jax.local_device_count(),
        config.batch_size,
        steps_per_epoch,
        config.num_epochs,
    )


def _initial_state(
    config, model: SPPNet, schedule: optax.Schedule, manager, *, init_from: str | None = None
) -> TrainState:
    """The state to train from: the latest checkpoint of ``manager`` if there is one,
    else the initial state of ``config.seed`` (host, unreplicated), with the parameters
    of the workdir ``init_from`` where their shapes match (:func:`init_params_from`)."""
    state = create_train_state(config, model, config.crop_size, create_optimizer(config, schedule))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    log.info("model %s/%s: %s parameters", config.model.arch, config.model.head, f"{n_params:,}")
    if manager.latest_step() is not None:
        state = restore_checkpoint(manager, state)
        ignored = " (init_from ignored: the checkpoint holds the run's parameters)"
        ignored = ignored if config.get("init_from") else ""
        log.info("resumed from checkpoint at step %d%s", int(state.step), ignored)
    elif init_from is not None:
        params = init_params_from(state.params, init_from)
        state = state.replace(params=params, opt_state=state.tx.init(params))
    return state


# ------------------------------------------------------------------ init_from (fine-tuning)

#: ``config.model`` fields that describe what the parameters compute: a run with
#: ``init_from`` takes them from that workdir's ``config.json``. The run keeps its own
#: ``dropout_rate`` and ``dtype`` (they change no parameter) and ``num_classes`` (its
#: dataset's).
INIT_FROM_MODEL_FIELDS = (
    "arch",
    "head",
    "levels",
    "width",
    "depth",
    "fc_dim",
    "base_size",
    "center_input",
    "spp_mode",
    "channel_major",
    "pool5",
)

_INIT_FROM_ACCEPTED = (
    "init_from accepts None or a classification workdir written by `spp-jax train` or "
    "`spp-jax import-weights`"
)


def check_init_from(path: str | os.PathLike) -> str:
    """Checks that ``path`` is a classification workdir with a checkpoint, a value
    ``config.init_from`` accepts, and returns it as a string.

    Raises:
      spp_jax.workdirs.WorkdirError: it does not exist, is a file, holds no run's
        ``config.json``, is a detection workdir, or has no checkpoint; the message names
        the path and what is accepted.

    >>> check_init_from("/nonexistent/run")
    Traceback (most recent call last):
    ...
    spp_jax.workdirs.WorkdirError: config key init_from: workdir '/nonexistent/run' does not exist: give the --workdir of a finished `spp-jax train` run; init_from accepts None or a classification workdir written by `spp-jax train` or `spp-jax import-weights`
    """  # noqa: E501
    try:
        return workdirs.require(path, "classification")
    except workdirs.WorkdirError as e:
        raise workdirs.WorkdirError(f"config key init_from: {e}; {_INIT_FROM_ACCEPTED}") from None


def _with_init_from_model(config, workdir: str, *, resuming: bool) -> tuple[Any, str | None]:
    """``config`` with the :data:`INIT_FROM_MODEL_FIELDS` of the model that ``init_from``
    describes, and the workdir to copy parameters from (None: nothing to copy).

    A new run reads them from ``config.init_from``'s ``config.json``. A resumed run whose
    config or own ``workdir/config.json`` names an ``init_from`` reads them (and
    ``init_from``) from its own ``config.json``, written when it started: it resumes the
    model its checkpoint holds even if the ``init_from`` workdir is gone or changed since,
    and copies no parameters (the checkpoint holds them).
    """
    if resuming:
        saved = workdirs.read_config(workdir) if workdirs.kind_of(workdir) else None
        if saved is None or not (config.get("init_from") or saved.get("init_from")):
            return config, None
        source, init_from = saved, saved.get("init_from")
    elif config.get("init_from"):
        source = workdirs.read_config(check_init_from(config.init_from))
        init_from = config.init_from
    else:
        return config, None
    config = copy.deepcopy(config)
    model = config.model.to_dict()
    changed = []
    for field in INIT_FROM_MODEL_FIELDS:
        old, value = _as_plain(model.get(field)), _as_plain(source.model.get(field))
        if old != value:
            changed.append(f"{field} {old!r} -> {value!r}")
        model[field] = value
    with config.unlocked():
        # A new group: the run's config may hold a field in another type (None, int).
        config.model = type(config.model)(model)
        config.init_from = init_from
    if resuming:
        return config, None
    log.info(
        "init_from %s: model %s/%s from its config.json%s",
        os.path.abspath(init_from),
        config.model.arch,
        config.model.head,
        f" (replacing this config's {', '.join(changed)})" if changed else "",
    )
    return config, str(init_from)


def _as_plain(value: Any) -> Any:
    """A config value comparable across JSON round trips (lists as tuples)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def init_params_from(params: Any, workdir: str | os.PathLike) -> Any:
    """``params`` with every layer whose arrays match, by name and shape, those of the
    latest checkpoint of the classification workdir ``workdir`` replaced by that
    checkpoint's arrays.

    A layer is a top-level entry (``conv1``, ``fc6``, ...); one that differs in any array
    (``fc8`` for another class count, ``fc6`` after another pyramid) or that the checkpoint
    lacks keeps its values in ``params``. Logs one line naming the copied and the new layers.

    Args:
      params: a model's parameters (``{"conv1": {"kernel": ..., "bias": ...}, ...}``), e.g.
        a fresh ``model.init(...)["params"]``.
      workdir: a workdir of ``spp-jax train`` or ``spp-jax import-weights``
        (:func:`check_init_from`).

    Returns:
      A tree of ``params``' structure and dtypes.

    Raises:
      spp_jax.workdirs.WorkdirError: ``workdir`` is not such a workdir.

    Example (``runs/alexnet`` from ``spp-jax import-weights``, a 10-class dataset)::

        model = create_model(with_num_classes(config, 10))
        params = init_params_from(model.init(key, x)["params"], "runs/alexnet")
        # conv1 ... conv5, fc6, fc7 imported; fc8 (4096 -> 10) keeps its init.
    """
    path = check_init_from(workdir)
    trained = workdirs.load_trained(path)
    source = trained.params
    out, copied, new = {}, [], []
    for layer, arrays in params.items():
        src = source.get(layer) if hasattr(source, "get") else None
        fresh = flax.traverse_util.flatten_dict(arrays, sep="/")
        theirs = flax.traverse_util.flatten_dict(src, sep="/") if hasattr(src, "items") else {}
        if theirs.keys() == fresh.keys() and all(
            np.shape(theirs[k]) == np.shape(v) for k, v in fresh.items()
        ):
            out[layer] = jax.tree_util.tree_map(
                lambda mine, their: jnp.asarray(their, jnp.asarray(mine).dtype), arrays, src
            )
            copied.append(layer)
        else:
            out[layer] = arrays
            new.append(f"{layer} {_shapes(fresh)} (there {_shapes(theirs) or 'absent'})")
    log.info(
        "init_from %s (step %d): copied %s; new (fresh init): %s",
        os.path.abspath(path),
        trained.step,
        ", ".join(copied) or "nothing",
        ", ".join(new) or "none",
    )
    return out


def _shapes(flat: dict[str, Any]) -> str:
    """``kernel (16, 10), bias (10,)`` of a layer's flattened arrays."""
    return ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in flat.items())


class _PmappedTrainStep:
    """:func:`train_step` pmapped over the local devices, counting its compilations.

    The first call on each batch shape waits for its result and logs how long the
    compilation and step took; ``compiles`` holds the per-device batch shape of each
    trace, i.e. one entry per bucket.
    """

    def __init__(self, schedule: optax.Schedule):
        self.compiles: list[tuple[int, ...]] = []
        self._seen_shapes: set[tuple[int, ...]] = set()

        def counted_train_step(state, batch):
            # Runs once per trace, i.e. once per bucket; records the per-device shape.
            self.compiles.append(tuple(batch["image"].shape))
            return train_step(state, batch, learning_rate_fn=schedule)

        self._step = jax.pmap(counted_train_step, axis_name=AXIS, donate_argnums=(0,))

    def __call__(self, p_state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        shape = batch["image"].shape
        if shape in self._seen_shapes:
            return self._step(p_state, batch)
        tc = time.perf_counter()
        p_state, metrics = self._step(p_state, batch)
        jax.block_until_ready(metrics)
        self._seen_shapes.add(shape)
        log.info(
            "train step for bucket %s ready in %.1f s (compiled %d bucket(s) so far)",
            shape,
            time.perf_counter() - tc,
            len(self.compiles),
        )
        return p_state, metrics


def _epoch_batches(config, builder, info, *, epoch: int, size: int, skip: int) -> Iterable:
    """This process's share of the training batches of ``epoch`` at input ``size``,
    without the first ``skip`` (the batches trained before a resume)."""
    return data_lib.train_batches(
        builder,
        info,
        split=config.train_split,
        epoch=epoch,
        size=size,
        crop_size=config.crop_size,
        local_batch_size=config.batch_size // jax.process_count(),
        global_batch_size=config.batch_size,
        seed=config.seed,
        resize_ratio=config.resize_ratio,
        shuffle_buffer=config.shuffle_buffer,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        skip_batches=skip,
        crop_mode=config.crop_mode,
        min_crop_area=config.min_crop_area,
    )


def _checkpoint_due(config, step: int) -> bool:
    """Whether ``config.checkpoint_every_steps`` (0: only at epoch ends) saves at ``step``."""
    every = config.checkpoint_every_steps
    return bool(every) and step % every == 0


def _epoch_record(
    step_metrics: list, *, epoch: int, step: int, size: int, started: float, compiles: int
) -> dict:
    """An epoch's line of ``metrics.jsonl``: the mean train loss and accuracy over its
    steps and the learning rate of its last step (``step_metrics``: replicated)."""
    per_step = [unreplicate_to_host(m) for m in step_metrics]
    n = len(per_step)
    sums = {k: sum(float(m[k]) for m in per_step) for k in ("loss", "accuracy")}
    return {
        "epoch": epoch + 1,
        "step": step,
        "size": size,
        "train_loss": sums["loss"] / n,
        "train_accuracy": sums["accuracy"] / n,
        "lr": float(per_step[-1]["lr"]),
        "epoch_seconds": time.perf_counter() - started,
        "train_compiles": compiles,
    }


def _log_epoch(config, record: dict) -> None:
    log.info(
        "epoch %d/%d size %d: loss %.4f, train acc %.3f%s, %.1f s",
        record["epoch"],
        config.num_epochs,
        record["size"],
        record["train_loss"],
        record["train_accuracy"],
        f", test acc {record['test_top1']:.3f}" if "test_top1" in record else "",
        record["epoch_seconds"],
    )


def _plot_curves(workdir: str) -> None:
    """``curves.png`` from ``metrics.jsonl`` (process 0); a failed plot only warns."""
    if jax.process_index() == 0:
        try:
            metrics_lib.plot_metrics(workdir)
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not plot metrics: %s", e)


# ------------------------------------------------------------------------ evaluation


@functools.cache
def _p_eval_step(apply_fn):
    return jax.pmap(functools.partial(eval_step, apply_fn=apply_fn), axis_name=AXIS)


def evaluate(config, builder, info, p_params, model: SPPNet, *, mode: str, size: int) -> dict:
    """Top-1/top-5 accuracy and loss over the whole eval split (all processes).

    Args:
      p_params: replicated parameters.
      mode: ``"center"`` crop or ``"full"`` image (aspect kept, bucketed, padded,
        with ``valid_sizes``).
      size: crop size, or short side of the full image.
    """
    p_eval = _p_eval_step(model.apply)
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    local_batch = config.eval_batch_size // jax.process_count()
    batches = data_lib.eval_batches(
        builder,
        info,
        split=config.eval_split,
        mode=mode,
        size=size,
        local_batch_size=local_batch,
        resize_ratio=config.resize_ratio,
        max_aspect=config.max_aspect,
        bucket_steps=config.full_image_bucket_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in batches:
        sums = unreplicate_to_host(p_eval(p_params, shard(batch)))
        for k in totals:
            totals[k] += float(sums[k])
    count = max(totals["count"], 1.0)
    return {
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": int(totals["count"]),
    }


def final_evaluation(config, builder, info, p_params, model) -> dict:
    """Centre-crop and (SPP head only) full-image accuracy at every ``eval_sizes``."""
    out: dict[str, dict] = {}
    for size in config.eval_sizes:
        row = {"center": evaluate(config, builder, info, p_params, model, mode="center", size=size)}
        if config.model.head == "spp" and config.eval_full_image:
            row["full"] = evaluate(config, builder, info, p_params, model, mode="full", size=size)
        out[str(size)] = row
    return out


def flat_metrics(final: dict) -> dict[str, float]:
    """Top-1 of a :func:`final_evaluation` result as ``{"{mode}_{size}": top1}``.

    The last line of ``metrics.jsonl`` holds it as ``"metrics"`` beside ``"final"``, and
    ``experiments/sweep.py`` records the same keys, so a sweep record can be checked
    against a re-run of its config, seed and overrides.

    >>> flat_metrics({"112": {"center": {"top1": 0.5}, "full": {"top1": 0.75}}})
    {'center_112': 0.5, 'full_112': 0.75}
    """
    return {
        f"{mode}_{size}": float(ev["top1"])
        for size, row in final.items()
        for mode, ev in row.items()
    }


def format_final(final: dict) -> str:
    lines = ["  size  centre-crop  full-image"]
    for size, row in final.items():
        full = f"{row['full']['top1']:10.4f}" if "full" in row else "       n/a"
        lines.append(f"  {size:>4}  {row['center']['top1']:11.4f}  {full}")
    return "\n".join(lines)


def evaluate_single_view(workdir: str, sizes: Iterable[int] | None = None) -> dict:
    """``spp-jax eval``: single-view accuracy of a workdir's latest checkpoint.

    The :func:`final_evaluation` (centre crop, and full image for the SPP head) at the
    config's ``eval_sizes``, or at ``sizes``; :func:`spp_jax.multiview.evaluate_multiview`
    is the multi-view test.
    """
    trained = workdirs.load_trained(workdir)
    config = trained.config
    if sizes is not None:
        config.eval_sizes = tuple(sizes)
    builder, info = load_dataset(config)
    final = final_evaluation(config, builder, info, replicate(trained.params), trained.model)
    log.info("test accuracy (top-1) at step %d:\n%s", trained.step, format_final(final))
    return final


def flatten_params(params) -> dict[str, np.ndarray]:
    """``{"a/b/kernel": array}``: handy for comparing runs."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}
