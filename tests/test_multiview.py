"""Tests for spp_jax.multiview: view windows, feature-map views against whole-network
crops (exact where they must agree), evaluation and the ``eval --views`` option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import cli, multiview
from spp_jax.models import SPPNet
from spp_jax.multiview import (
    VIEW_COUNTS,
    batch_view_boxes,
    evaluate_batches,
    feature_map_view_probs,
    multiview_scores,
    view_boxes,
    view_size_for,
    whole_net_view_probs,
)

TINY = {"width": 0.125, "fc_dim": 32, "depth": 0.34, "num_classes": 5}


def _params(net: SPPNet, fc8_scale: float = 1.0):
    """``net.init`` params (conv biases are 0), fc8 scaled so that the softmax is far
    from uniform and a wrong window shows in the probabilities."""
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    params = dict(params)
    params["fc8"] = {**params["fc8"], "kernel": params["fc8"]["kernel"] * fc8_scale}
    return params


@pytest.fixture(scope="module")
def centred():
    net = SPPNet(**TINY, center_input=True)
    return net, _params(net, fc8_scale=300.0)


@pytest.fixture(scope="module")
def plain():
    net = SPPNet(**TINY)
    return net, _params(net, fc8_scale=300.0)


def _images(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------
# View windows.
# --------------------------------------------------------------------------------------


def test_view_boxes_by_hand():
    # 4 x 6 image, 2 x 2 views: centre (6-2)//2 = 2, (4-2)//2 = 1.
    assert view_boxes(4, 6, 2, 1) == ((2, 1, 4, 3),)
    assert view_boxes(4, 6, 2, 10) == (
        (2, 1, 4, 3),  # centre
        (0, 0, 2, 2),  # top-left
        (4, 0, 6, 2),  # top-right
        (0, 2, 2, 4),  # bottom-left
        (4, 2, 6, 4),  # bottom-right
    )
    assert view_boxes(4, 6, 2, 18) == (
        *view_boxes(4, 6, 2, 10),
        (2, 0, 4, 2),  # top edge centre
        (2, 2, 4, 4),  # bottom
        (0, 1, 2, 3),  # left
        (4, 1, 6, 3),  # right
    )
    # Odd margins round the centre down, as the centre crop does: (7-2)//2, (5-2)//2.
    assert view_boxes(5, 7, 2, 1) == ((2, 1, 4, 3),)
    # A view the size of a square image: every window is the image, none dropped.
    assert view_boxes(3, 3, 3, 18) == ((0, 0, 3, 3),) * 9
    assert batch_view_boxes(np.array([[4, 6], [1, 1]]), 2, 10, mask=np.array([1, 0])).tolist() == [
        [list(b) for b in view_boxes(4, 6, 2, 10)],
        [[0, 0, 2, 2]] * 5,  # batch filler: any window
    ]


def test_view_boxes_errors():
    for bad in (0, 2, 5, 9, 20, True, "10"):
        with pytest.raises(ValueError, match=rf"views must be one of 1, 10, 18 .*got {bad!r}"):
            view_boxes(4, 6, 2, bad)
    with pytest.raises(ValueError, match="view_size 5 does not fit in a 4x6 image"):
        view_boxes(4, 6, 5, 10)
    with pytest.raises(ValueError, match="view_size must be a positive int, got 0"):
        view_boxes(4, 6, 0, 10)


def test_view_size_rule():
    assert view_size_for(256, 256 / 224) == 224  # the paper: 224 views of 256 images
    assert view_size_for(128, 256 / 224) == 112  # the default config's crop
    assert view_size_for(90, 1.0) == 90
    assert view_size_for(90, 0.5) == 90  # never larger than the short side


# --------------------------------------------------------------------------------------
# Exact agreement where the two paths must agree.
# --------------------------------------------------------------------------------------


def test_whole_image_view_is_the_network(centred):
    """A view that is the whole image is the whole conv5 map: the feature-map score is
    the network's full-image score, padded batch and mirrored views included."""
    net, params = centred
    n = 64
    imgs = _images((2, n, n, 3), 1)
    padded = np.full((2, 80, 96, 3), 7.0, np.float32)  # garbage in the padding
    padded[:, :n, :n] = imgs
    sizes = np.array([[n, n], [n, n]], np.int32)
    alone = jax.nn.softmax(net.apply({"params": params}, jnp.asarray(imgs)))
    mirrored = jax.nn.softmax(net.apply({"params": params}, jnp.asarray(imgs[:, :, ::-1])))
    assert float(jnp.max(alone)) > 0.6  # far from uniform: a wrong window would show

    one = multiview_scores(net, params, padded, sizes, view_size=n, views=1)
    np.testing.assert_allclose(jnp.log(one), jnp.log(alone), atol=1e-4)
    for method in ("feature_map", "whole_net"):
        per_view = multiview_scores(
            net, params, padded, sizes, view_size=n, views=10, method=method, per_view=True
        )
        assert per_view.shape == (2, 10, 5)
        want = jnp.concatenate(
            [jnp.repeat(alone[:, None], 5, 1), jnp.repeat(mirrored[:, None], 5, 1)], 1
        )
        np.testing.assert_allclose(jnp.log(per_view), jnp.log(want), atol=1e-4, err_msg=method)


def test_interior_views_agree_exactly(plain):
    """Image k is zero except well inside view window k (40 px from its border), conv
    biases are 0 and the input is not centred: the crop alone then sees the same
    numbers as the whole image around that window, so with the aligned mapping view k
    (and its mirror) scores exactly as the crop through the whole network. The
    paper's projection takes other cells."""
    net, params = plain
    h, w, s, margin = 160, 192, 128, 40  # every view corner is on the 16-px grid
    boxes = view_boxes(h, w, s, 10)
    rng = np.random.default_rng(2)
    imgs = np.zeros((len(boxes), h, w, 3), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        imgs[k, y1 + margin : y2 - margin, x1 + margin : x2 - margin] = rng.normal(
            size=(s - 2 * margin, s - 2 * margin, 3)
        )
    fm = multiview_scores(net, params, imgs, view_size=s, views=10, per_view=True)
    wn = multiview_scores(
        net, params, imgs, view_size=s, views=10, per_view=True, method="whole_net"
    )
    paper = multiview_scores(
        net, params, imgs, view_size=s, views=10, per_view=True, mapping="paper"
    )
    k = np.arange(len(boxes))
    for v in (k, k + len(boxes)):  # the window and its mirror
        # Log-probabilities: logits up to a constant, so no class hides in saturation.
        np.testing.assert_allclose(jnp.log(fm[k, v]), jnp.log(wn[k, v]), atol=1e-4)
        off = jnp.max(jnp.abs(jnp.log(paper[k, v]) - jnp.log(wn[k, v])), axis=-1)
        assert float(jnp.min(off)) > 1.0, off
    assert float(jnp.max(wn[k, k])) > 0.6


def test_general_views_differ_slightly_and_average():
    """Real image content around the views: the two paths differ (padding, ceil pools,
    the image's mean colour), a little; both give probability vectors per view, and
    the score is their mean."""
    net = SPPNet(**TINY, center_input=True, levels=(6, 3, 2, 1))
    params = _params(net)
    imgs = jnp.asarray(_images((2, 96, 128, 3), 3))
    fm = multiview_scores(net, params, imgs, view_size=80, views=18, per_view=True)
    wn = multiview_scores(
        net, params, imgs, view_size=80, views=18, per_view=True, method="whole_net"
    )
    for probs in (fm, wn):
        assert probs.shape == (2, 18, 5)
        assert bool(jnp.all(probs >= 0))
        np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        multiview_scores(net, params, imgs, view_size=80, views=18), jnp.mean(fm, 1), atol=1e-7
    )
    diff = float(jnp.max(jnp.abs(fm - wn)))
    assert 0 < diff < 0.05, diff
    mean_diff = float(jnp.max(jnp.abs(jnp.mean(fm, 1) - jnp.mean(wn, 1))))
    assert mean_diff < 0.02, mean_diff


def test_one_program_per_bucket(centred):
    """Image sizes inside a bucket and view positions are traced: no recompile."""
    net, params = centred
    imgs = jnp.asarray(_images((2, 80, 96, 3), 4))
    sizes = np.array([[64, 64], [80, 70]], np.int32)
    for method in ("feature_map", "whole_net"):
        multiview_scores(net, params, imgs, sizes, view_size=64, views=10, method=method)
    n_fm = feature_map_view_probs._cache_size()
    n_wn = whole_net_view_probs._cache_size()
    for sizes in ([[70, 96], [64, 90]], [[80, 64], [66, 66]]):
        for method in ("feature_map", "whole_net"):
            multiview_scores(net, params, imgs, np.array(sizes), view_size=64, method=method)
    assert feature_map_view_probs._cache_size() == n_fm
    assert whole_net_view_probs._cache_size() == n_wn


# --------------------------------------------------------------------------------------
# Errors, evaluation, CLI.
# --------------------------------------------------------------------------------------


def test_errors():
    x = jnp.zeros((1, 112, 112, 3))
    pool6 = SPPNet(**TINY, head="pool6", base_size=112)
    with pytest.raises(ValueError, match=r"needs head=\"spp\".*got head='pool6'"):
        multiview_scores(pool6, {}, x, view_size=112, views=10)
    net = SPPNet(**TINY)
    with pytest.raises(ValueError, match=r"views must be one of 1, 10, 18 .*got 4"):
        multiview_scores(net, {}, x, view_size=96, views=4)
    with pytest.raises(ValueError, match=r"unknown mapping 'exact'"):
        multiview_scores(net, {}, x, view_size=96, mapping="exact")
    with pytest.raises(ValueError, match=r"unknown method 'crops'"):
        multiview_scores(net, {}, x, view_size=96, method="crops")


def test_previous_names_still_work_with_a_warning():
    net = SPPNet(**TINY)
    with pytest.warns(DeprecationWarning, match="is now has_flipped_views"):
        assert multiview.flips(10) is multiview.has_flipped_views(10) is True
    with pytest.warns(DeprecationWarning, match="is now evaluate_multiview"):
        assert multiview.evaluate_workdir is multiview.evaluate_multiview
    with pytest.warns(DeprecationWarning, match=r"model.conv_trunk.total_stride"):
        assert multiview.total_stride(net) == net.conv_trunk.total_stride == 16
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        multiview.nothing  # noqa: B018


def test_evaluate_batches(centred):
    net, params = centred
    rng = np.random.default_rng(5)
    batches = []
    for sizes, mask in (([[64, 64], [80, 70]], [1, 1]), ([[70, 96], [1, 1]], [1, 0])):
        sizes = np.array(sizes, np.int32)
        img = np.zeros((2, 80, 96, 3), np.float32)
        for i, (hh, ww) in enumerate(sizes):
            img[i, :hh, :ww] = rng.normal(size=(hh, ww, 3))
        batches.append(
            {
                "image": img,
                "label": np.array([0, 3], np.int32),
                "mask": np.array(mask, np.float32),
                "valid_sizes": sizes,
            }
        )
    out = evaluate_batches(net, params, batches, view_size=64, views=10, compare_whole_net=True)
    assert out["count"] == 3 and out["views"] == 10 and out["view_size"] == 64
    # Top-1 by hand from the scores of the real images.
    hits = {"feature_map": 0, "whole_net": 0}
    for b in batches:
        for method in hits:
            real = b["mask"] > 0
            p = multiview_scores(
                net,
                params,
                b["image"][real],
                b["valid_sizes"][real],
                view_size=64,
                views=10,
                method=method,
            )
            hits[method] += int(np.sum(np.argmax(p, -1) == b["label"][real]))
    for method in hits:
        r = out[method]
        assert r["top1"] == pytest.approx(hits[method] / 3)
        assert r["top1"] <= r["top5"] == 1.0  # 5 classes
        assert r["seconds_per_image"] > 0 and r["programs"] == 1
    assert 0 <= out["agreement"] <= 1 and 0 <= out["max_abs_diff"] < 0.5
    limited = evaluate_batches(net, params, batches, view_size=64, views=10, limit=1)
    assert limited["count"] == 1 and "whole_net" not in limited
    assert "feature map" in multiview.format_table({"128": out})


def test_cli_views_option(capsys):
    assert VIEW_COUNTS == (1, 10, 18)
    for bad in ("7", "0", "ten", "10.0"):
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--workdir", "nowhere", "--views", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --views: {bad!r} is not accepted; use 1, 10 or 18" in err, err


def test_cli_eval_dispatch(monkeypatch, tmp_path):
    from spp_jax import train

    calls = []
    monkeypatch.setattr(cli, "_import_tensorflow_quietly", lambda: None)
    monkeypatch.setattr(
        train, "evaluate_single_view", lambda *a, **k: calls.append(("train", a, k))
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w" / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "w" / "config.json").write_text('{"model": {"head": "spp"}}')
    cli.main(["eval", "--workdir", "w", "--sizes", "96,128"])
    assert calls == [("train", ("w", [96, 128]), {})]  # --views 1: the existing evaluation

    # No workdir / a pool6 model: one line naming the problem.
    (tmp_path / "p" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"eval: error: 'p' is not a workdir"):
        cli.main(["eval", "--workdir", "p", "--views", "10"])
    (tmp_path / "p" / "checkpoints" / "10").mkdir()
    (tmp_path / "p" / "config.json").write_text('{"model": {"head": "pool6"}}')
    with pytest.raises(SystemExit, match=r"eval: error: .*needs head=\"spp\".*head='pool6'"):
        cli.main(["eval", "--workdir", "p", "--views", "18"])

    monkeypatch.setattr(multiview, "evaluate_multiview", lambda *a, **k: calls.append(("mv", a, k)))
    cli.main(["eval", "--workdir", "w", "--views", "18", "--compare-whole-net"])
    cli.main(["eval", "--workdir", "w", "--views", "1", "--compare-whole-net", "--sizes", "90"])
    assert calls[1:] == [
        ("mv", ("w", None), {"views": 18, "compare_whole_net": True}),
        ("mv", ("w", [90]), {"views": 1, "compare_whole_net": True}),
    ]
