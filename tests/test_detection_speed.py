"""experiments/benchmarks/detection_speed.py: SPP-net against R-CNN, timed per stage.

Runs the benchmark's ``main`` in-process on a shrunken network and image (hidden
flags), so only the plumbing is checked: every JSON key, positive finite ratios,
the pooled feature shapes; plus R-CNN's crop rule (16 px of context after warping).
"""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.models import ConvTrunk

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "benchmarks" / "detection_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("detection_speed", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TINY = dict(width=0.0625, fc_dim=32, windows=10, rcnn_windows=4, batch=2)


def test_main_writes_every_key(bench, tmp_path, capsys):
    out = tmp_path / "r" / "detection_speed.json"
    argv = [
        *("--width", str(_TINY["width"]), "--fc-dim", str(_TINY["fc_dim"])),
        *("--image-size", "80", "60", "--single-scale", "64", "--scales", "48", "64"),
        *("--windows", str(_TINY["windows"]), "--rcnn-windows", str(_TINY["rcnn_windows"])),
        *("--batch", str(_TINY["batch"]), "--repeats", "1", "--json", str(out)),
    ]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "total time / image" in printed and "scaled linearly" in printed
    res = json.loads(out.read_text())
    for key in (
        "conv_ratio_1scale",
        "total_ratio_1scale",
        "conv_ratio_5scale",
        "total_ratio_5scale",
    ):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    n = _TINY["windows"]
    assert res["windows"] == n and res["rcnn_windows_timed"] == 4 and res["rcnn_scaled_linearly"]
    assert sum(res["windows_per_scale"].values()) == n
    sec = res["seconds"]
    stages = {
        "spp_1scale": ("conv", "pool", "fc", "conv_image", "total"),
        "spp_5scale": ("conv", "pool", "fc", "conv_image", "total"),
        "rcnn": ("crop_warp", "conv", "pool5", "fc", "pool5_fc", "conv_image", "total"),
    }
    for method, keys in stages.items():
        for k in keys:
            assert math.isfinite(sec[method][k]) and sec[method][k] > 0, (method, k)
    assert sec["spp_5scale"]["scales"] == [48, 64]
    assert res["conv_ratio_1scale"] == pytest.approx(
        sec["rcnn"]["conv_image"] / sec["spp_1scale"]["conv_image"]
    )
    c5 = ConvTrunk(width=_TINY["width"]).out_channels
    dim = c5 * (36 + 9 + 4 + 1)
    assert res["shapes"]["spp_pooled_1scale"] == [n, dim]
    assert res["shapes"]["spp_pooled_multiscale"] == [n, dim]
    assert res["shapes"]["rcnn_crops"] == [2, 224, 224, 3]
    assert res["shapes"]["rcnn_conv5"] == [2, 13, 13, c5]
    assert res["shapes"]["rcnn_pool5"] == [4, 36 * c5]
    assert res["shapes"]["scores"] == [n, 20]
    assert all(v >= 0 for v in res["compile_seconds"].values())
    env = res["env"]
    for k in ("jax", "jaxlib", "python", "cpu", "threads", "load_start", "load_end"):
        assert env[k] is not None, k
    assert env["peak_rss_mib"] > 0
    assert "onednn_convs" in env


def test_quick_flag(bench):
    args = bench._parse_args(["--quick"])
    assert (args.windows, args.scales, args.rcnn_windows) == (200, [688], 16)


def test_windows_inside_the_image(bench):
    boxes = bench.synthetic_windows(500, 500, 375, seed=0)
    assert boxes.shape == (500, 4) and boxes.dtype == np.float32
    assert (boxes[0] == [0, 0, 500, 375]).all()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all()
    assert w.min() >= 20 and h.min() >= 20 and w.max() == 500 and h.max() == 375
    assert (
        bench.synthetic_windows(50, 500, 375, seed=3)
        == bench.synthetic_windows(50, 500, 375, seed=3)
    ).all()


def test_rcnn_warp_context(bench):
    img = jnp.asarray(np.random.default_rng(0).normal(size=(375, 500, 3)).astype(np.float32))
    boxes = jnp.asarray([[100.0, 80.0, 292.0, 272.0], [0.0, 0.0, 500.0, 375.0]])
    out = jax.jit(bench.rcnn_warp)(img, boxes)
    assert out.shape == (2, 224, 224, 3)
    # A 192-px box grown by 224/192 is a 224-px window inside the image: copied as is.
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(img[64:288, 84:308]))
    # The whole image: 16 px of zero (mean) context on each side, the image warped inside.
    inside = np.asarray(jnp.abs(out[1]).sum(-1) > 0)
    rows, cols = np.where(inside.any(1))[0], np.where(inside.any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (16, 207, 16, 207)
    ref = jax.jit(lambda x: jax.image.resize(x, (192, 192, 3), "bilinear", antialias=False))(img)
    np.testing.assert_allclose(np.asarray(out[1, 16:208, 16:208]), np.asarray(ref), atol=1e-5)
