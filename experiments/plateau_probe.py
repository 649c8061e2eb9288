"""Why the default run's loss sat at chance: a short probe of the first epochs.

Trains the ``default`` config (same data, schedule, optimiser and step as ``spp-jax
train``, on one device, no checkpoints or evaluation) for a few epochs per (variant,
seed) and records the mean training loss of each epoch. Chance is ln(10) = 2.303.

Run (from the repository root; about 45 s per run of 4 epochs on 2 CPU cores)::

    python experiments/plateau_probe.py --epochs 4 --seeds 0 1 2 \\
        --variants center nocenter --json experiments/results/plateau_probe.json

Variants (each is the ``default`` config plus a change):

* ``center``: the shipped default (``model.center_input=True``).
* ``nocenter``: ``model.center_input=False`` (ImageNet mean/std only, as before).
* ``nocenter_nolrn``: as ``nocenter``, with both LRN layers removed.
* ``nocenter_batchstats`` / ``center_batchstats``: every conv output normalised with its
  batch's per-channel mean and variance (training-mode batch norm without running
  statistics or scale/shift parameters). A diagnosis only, not a model: it tells
  whether the plateau comes from signal propagation (which this removes) or from the
  data.
* Any variant accepts ``--set KEY=VALUE`` overrides (as ``spp-jax train``), e.g.
  ``--set learning_rate=0.003``.

The diagnosis-only changes patch :mod:`spp_jax.models` in this process alone.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import data as data_lib
from spp_jax import models
from spp_jax import train as train_lib
from spp_jax.cli import load_config

VARIANTS = ("center", "nocenter", "nocenter_nolrn", "nocenter_batchstats", "center_batchstats")


def _patch(variant: str) -> None:
    if variant.endswith("_nolrn"):
        models.local_response_norm = lambda x, *a, **k: x
    if variant.endswith("_batchstats"):
        conv_call = models._Conv.__call__

        def normalised(self, x):
            y = conv_call(self, x)
            mean = y.mean((0, 1, 2), keepdims=True)
            return (y - mean) * jax.lax.rsqrt(y.var((0, 1, 2), keepdims=True) + 1e-5)

        models._Conv.__call__ = normalised


def probe(variant: str, seed: int, epochs: int, overrides: list[str]) -> dict:
    """Mean training loss per epoch of one (variant, seed)."""
    center = "true" if variant.startswith("center") else "false"
    config = load_config("default", [f"seed={seed}", f"model.center_input={center}", *overrides])
    _patch(variant)
    builder, info = train_lib.load_dataset(config)
    steps = data_lib.steps_per_epoch(info, config.train_split, config.batch_size)
    config = train_lib.with_num_classes(config, info.num_classes)
    model = train_lib.create_model(config)
    schedule = train_lib.learning_rate_schedule(config, steps)
    state = train_lib.create_train_state(
        config, model, config.crop_size, train_lib.create_optimizer(config, schedule)
    )

    @jax.jit
    def step(state, image, label):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, image, train=True, rngs={"dropout": key})
            return train_lib.cross_entropy(logits, label, jnp.ones(label.shape, jnp.float32))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses, start = [], time.perf_counter()
    for epoch in range(epochs):
        size = data_lib.train_size_for_epoch(
            config.train_sizes, config.size_schedule, epoch, config.seed
        )
        batches = data_lib.train_batches(
            builder,
            info,
            split=config.train_split,
            epoch=epoch,
            size=size,
            crop_size=config.crop_size,
            local_batch_size=config.batch_size,
            global_batch_size=config.batch_size,
            seed=config.seed,
            resize_ratio=config.resize_ratio,
            crop_mode=config.crop_mode,
            min_crop_area=config.min_crop_area,
        )
        epoch_losses = []
        for batch in batches:
            state, loss = step(state, batch["image"], batch["label"])
            epoch_losses.append(float(loss))
        losses.append(round(float(np.mean(epoch_losses)), 4))
        print(f"{variant} seed {seed} epoch {epoch + 1} (size {size}): loss {losses[-1]:.4f}")
    return {
        "variant": variant,
        "seed": seed,
        "overrides": overrides,
        "epoch_loss": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["center", "nocenter"], choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the records here (a JSON list)")
    args = p.parse_args()
    # Each (variant, seed) in a fresh process would isolate the patches; here the
    # patching variants must come last, one per invocation.
    patching = [v for v in args.variants if v.endswith(("_nolrn", "_batchstats"))]
    if len(patching) > 1 or (patching and args.variants[-1] != patching[0]):
        raise SystemExit(f"run a patching variant ({patching}) last and alone in its invocation")
    records = [probe(v, s, args.epochs, args.overrides) for v in args.variants for s in args.seeds]
    for r in records:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
