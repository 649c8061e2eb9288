"""spp_jax.pretrained: torchvision's AlexNet and VGG-16 imported exactly.

Against torchvision where torch is installed (random weights: conversion is what is
tested); everywhere, against tests/data/torchvision_tiny.npz: width-reduced models with
torchvision's key names and layer kinds, an input and their torch outputs, written by
experiments/make_pretrained_fixture.py. So the key mapping, the transposes and the flatten order
are checked with or without torch.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import pretrained
from spp_jax.models import TORCHVISION_ARCHS

FIXTURE = pathlib.Path(__file__).parent / "data" / "torchvision_tiny.npz"
LEVELS = (6, 3, 2, 1)


def _close(ours, ref):
    ref = np.asarray(ref)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=2e-5 * scale)


@pytest.fixture(scope="module")
def tiny():
    """arch -> (state_dict of float16 arrays, width, x, logits, spp features)."""
    data = np.load(FIXTURE)
    out = {}
    for arch in TORCHVISION_ARCHS:
        prefix = f"{arch}/params/"
        state = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        out[arch] = (
            state,
            float(data[f"{arch}/width"]),
            data[f"{arch}/x"].astype(np.float32),
            data[f"{arch}/logits"],
            data[f"{arch}/spp"],
        )
    return out


@pytest.fixture(scope="module")
def tiny_models(tiny):
    """arch -> (model, variables, jitted apply) of the fixture's weights."""
    out = {}
    for arch, (state, width, *_) in tiny.items():
        model, variables = pretrained.from_torchvision(state, arch, width=width)
        out[arch] = (model, variables, jax.jit(model.apply))
    return out


# --------------------------------------------------------------------------------------
# Without torch: the stored fixture.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_fixture_logits_equal_torch(tiny, tiny_models, arch):
    _, _, x, logits, _ = tiny[arch]
    _, variables, apply = tiny_models[arch]
    _close(apply(variables, jnp.asarray(x)), logits)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_fixture_spp_features_equal_torch(tiny, tiny_models, arch):
    _, _, x, _, spp = tiny[arch]
    _, variables, _ = tiny_models[arch]
    _close(pretrained.spp_features(variables, x, arch, LEVELS), spp)


def test_spp_features_order_options(tiny, tiny_models):
    """channel_major=False is spp_jax's (n_h, n_w, C) order of the same values."""
    _, _, x, _, spp = tiny["alexnet"]
    _, variables, _ = tiny_models["alexnet"]
    ours = np.asarray(pretrained.spp_features(variables, x, "alexnet", (2,), channel_major=False))
    c = variables["params"]["conv5"]["bias"].shape[0]
    torch_order = spp[:, c * (36 + 9) : c * (36 + 9 + 4)]  # level 2 of (6, 3, 2, 1)
    _close(ours.reshape(1, 2, 2, c).transpose(0, 3, 1, 2).reshape(1, -1), torch_order)


def test_expected_shapes_full_models():
    """torchvision's parameter counts: AlexNet 61,100,840, VGG-16 138,357,544."""
    counts = {
        a: sum(map(np.prod, pretrained.expected_shapes(a).values())) for a in TORCHVISION_ARCHS
    }
    assert counts == {"alexnet": 61_100_840, "vgg16": 138_357_544}
    assert list(pretrained.expected_shapes("vgg16"))[:3] == [
        "features.0.weight",
        "features.0.bias",
        "features.2.weight",
    ]


def test_padded_batch_exact(tiny, tiny_models):
    """valid_sizes: each image of a NaN-padded batch equals the image alone, for the
    logits (through pool5 and the average pyramid) and the SPP features."""
    _, _, x, torch_logits, torch_spp = tiny["alexnet"]
    _, variables, apply = tiny_models["alexnet"]
    other = np.random.default_rng(1).standard_normal((1, 90, 120, 3)).astype(np.float32)
    padded = np.full((2, *x.shape[1:]), np.nan, np.float32)
    padded[0] = x[0]
    padded[1, :90, :120] = other[0]
    sizes = np.array([x.shape[1:3], (90, 120)], np.int32)
    logits = apply(variables, jnp.asarray(padded), valid_sizes=sizes)
    feats = pretrained.spp_features(variables, padded, "alexnet", LEVELS, sizes)
    _close(logits[:1], torch_logits)
    _close(feats[:1], torch_spp)
    _close(logits[1:], apply(variables, jnp.asarray(other)))
    _close(feats[1:], pretrained.spp_features(variables, other, "alexnet", LEVELS))


def test_one_compile_per_shape(tiny, tiny_models):
    _, _, x, _, _ = tiny["vgg16"]
    _, variables, _ = tiny_models["vgg16"]
    padded = np.concatenate([x, x])
    pretrained.spp_features(variables, padded, "vgg16", (2, 1), np.array([[80, 48], [40, 40]]))
    before = pretrained._spp_features._cache_size()
    pretrained.spp_features(variables, padded, "vgg16", (2, 1), np.array([[50, 30], [80, 48]]))
    assert pretrained._spp_features._cache_size() == before


def test_normalize():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\) RGB"):
        pretrained.normalize(np.zeros((2, 4)))
    x = np.random.default_rng(0).uniform(size=(2, 4, 5, 3)).astype(np.float32)
    want = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32
    )
    _close(pretrained.normalize(x), want)


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


def test_missing_extra_and_misshapen_keys(tiny):
    state, width, *_ = tiny["alexnet"]
    bad = dict(state)
    del bad["features.3.weight"]
    bad["features.0.weight"] = bad["features.0.weight"].transpose(0, 2, 3, 1)
    bad["features.1.weight"] = np.zeros(3, np.float32)
    with pytest.raises(pretrained.WeightsError) as e:
        pretrained.from_torchvision(bad, "alexnet", width=width)
    msg = str(e.value)
    assert "missing features.3.weight (expected shape (12, 4, 5, 5))" in msg
    assert "unexpected key features.1.weight" in msg
    assert "features.0.weight has shape (4, 11, 11, 3), expected (4, 3, 11, 11)" in msg


def test_wrong_width_names_expected_shape(tiny):
    state, *_ = tiny["alexnet"]
    with pytest.raises(pretrained.WeightsError, match=r"expected \(64, 3, 11, 11\)"):
        pretrained.from_torchvision(state, "alexnet")  # a width-1/16 state_dict


def test_bad_arch_and_input():
    with pytest.raises(ValueError, match="unknown torchvision arch 'resnet50'; accepted"):
        pretrained.from_torchvision({}, "resnet50")
    with pytest.raises(pretrained.WeightsError, match="mapping"):
        pretrained.from_torchvision([1, 2], "alexnet")


def test_too_small_input(tiny_models):
    model, variables, _ = tiny_models["alexnet"]
    with pytest.raises(ValueError, match=r"needs a map of at least 3x3, got 2x2"):
        model.apply(variables, jnp.zeros((1, 50, 50, 3)))


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load(tmp_path / "none.pth", "alexnet")
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown suffix; accepted: \.pth or \.pt"):
        pretrained.load(npz, "alexnet")
    for name, module in (("w.pth", "torch"), ("w.safetensors", "safetensors.numpy")):
        (tmp_path / name).write_bytes(b"")
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ImportError, match=r"torch|spp-jax\[weights\]"):
            pretrained.load(tmp_path / name, "alexnet")


def _assert_same_import(loaded, imported):
    """The model and parameters of a file equal those of the state_dict it holds (whose
    logits the fixture tests check)."""
    (model, variables), (want_model, want_variables, _) = loaded, imported
    assert model == want_model
    jax.tree.map(np.testing.assert_array_equal, variables, want_variables)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_safetensors_file(tiny, tiny_models, tmp_path, arch):
    st = pytest.importorskip("safetensors.numpy")
    state, width, *_ = tiny[arch]
    path = tmp_path / f"{arch}.safetensors"
    st.save_file({k: v.astype(np.float32) for k, v in state.items()}, str(path))
    _assert_same_import(pretrained.load(path, arch, width=width), tiny_models[arch])


# --------------------------------------------------------------------------------------
# With torch: torchvision's own models.
# --------------------------------------------------------------------------------------


def _torchvision(arch):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    with torch.no_grad():  # torchvision initialises biases to 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return torch, model


@pytest.fixture(scope="module")
def alexnet():
    torch, tv = _torchvision("alexnet")
    model, variables = pretrained.from_torchvision(tv.state_dict(), "alexnet")
    return torch, tv, model, variables, jax.jit(model.apply)


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _torch_spp(torch, tv, x, levels=LEVELS):
    f = torch.nn.functional
    with torch.no_grad():
        conv5 = tv.features[:-1](_nchw(torch, x))
        return torch.cat([f.adaptive_max_pool2d(conv5, n).flatten(1) for n in levels], 1).numpy()


@pytest.mark.parametrize("hw", [(224, 224), (200, 300), (257, 193)])
def test_alexnet_equals_torchvision(alexnet, hw):
    torch, tv, _, variables, apply = alexnet
    x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tv(_nchw(torch, x)).numpy()
    _close(apply(variables, jnp.asarray(x)), ref)
    _close(pretrained.spp_features(variables, x, "alexnet"), _torch_spp(torch, tv, x))


def test_alexnet_padded_spp_features_equal_torch(alexnet):
    torch, tv, _, variables, _ = alexnet
    rng = np.random.default_rng(2)
    sizes = [(230, 170), (150, 260)]
    padded = np.zeros((2, 230, 260, 3), np.float32)
    refs = []
    for i, (h, w) in enumerate(sizes):
        padded[i, :h, :w] = rng.standard_normal((h, w, 3))
        refs.append(_torch_spp(torch, tv, padded[i : i + 1, :h, :w]))
    ours = pretrained.spp_features(variables, padded, "alexnet", valid_sizes=np.array(sizes))
    _close(ours, np.concatenate(refs))


def test_vgg16_equals_torchvision():
    torch, tv = _torchvision("vgg16")
    model, variables = pretrained.from_torchvision(tv.state_dict(), "vgg16")
    assert pretrained.expected_shapes("vgg16") == {
        k: tuple(v.shape) for k, v in tv.state_dict().items()
    }
    rng = np.random.default_rng(0)
    for shape in [(2, 64, 96, 3), (1, 224, 224, 3)]:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = tv(_nchw(torch, x)).numpy()
        _close(model.apply(variables, jnp.asarray(x)), ref)
    x = rng.standard_normal((1, 64, 96, 3)).astype(np.float32)
    _close(pretrained.spp_features(variables, x, "vgg16"), _torch_spp(torch, tv, x))


def test_pth_file(alexnet, tiny, tiny_models, tmp_path):
    torch, tv, *_ = alexnet
    assert pretrained.expected_shapes("alexnet") == {
        k: tuple(v.shape) for k, v in tv.state_dict().items()
    }
    state, width, *_ = tiny["alexnet"]
    path = tmp_path / "alexnet.pth"
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, path)
    _assert_same_import(pretrained.load(path, "alexnet", width=width), tiny_models["alexnet"])
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(pretrained.WeightsError, match="holds a list, not a state_dict"):
        pretrained.load(tmp_path / "list.pth", "alexnet")


# --------------------------------------------------------------------------------------
# The imported workdir (spp-jax import-weights).
# --------------------------------------------------------------------------------------


def test_import_weights_workdir_extract(tiny, tiny_models, tmp_path):
    """import-weights writes a workdir that load_trained reads back as the same model and
    parameters, and whose `extract` features are the model's fc6 input on the pipeline's
    images (normalised with torchvision's mean and std)."""
    st = pytest.importorskip("safetensors.numpy")
    pytest.importorskip("orbax.checkpoint")
    from PIL import Image

    from spp_jax import cli, data, workdirs
    from spp_jax.extract import extract_features
    from spp_jax.models import SPPNet

    state, width, *_ = tiny["alexnet"]
    weights = tmp_path / "alexnet.safetensors"
    st.save_file({k: v.astype(np.float32) for k, v in state.items()}, str(weights))
    workdir = tmp_path / "run"
    argv = ["import-weights", "--arch", "alexnet", "--weights", str(weights)]
    assert cli.main([*argv, "--workdir", str(workdir), "--width", str(width)]) == 0
    trained = workdirs.load_trained(workdir)
    model, variables, _ = tiny_models["alexnet"]
    assert trained.model == model and trained.step == 0
    jax.tree.map(np.testing.assert_array_equal, trained.params, variables["params"])
    with pytest.raises(SystemExit, match="holds a run already"):
        cli.main([*argv, "--workdir", str(workdir), "--width", str(width)])

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    out = extract_features(str(workdir), str(images), str(tmp_path / "f.npz"), size=96)
    x = data.preprocess_full(pixels, 96)
    want = model.apply(variables, jnp.asarray(x[None]), method=SPPNet.features)
    _close(out["features"], want)
