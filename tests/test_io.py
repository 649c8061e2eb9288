"""Atomic writes (spp_jax._io) and row padding (spp_jax._padding)."""

import os
from typing import Any

import numpy as np
import pytest

from spp_jax._io import atomic_open, atomic_path, atomic_write_bytes, atomic_write_json
from spp_jax._padding import pad_rows, power_of_two, round_up


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    atomic_write_json(path, {"b": [1, 2], "a": 0.5}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": 0.5,\n "b": [\n  1,\n  2\n ]\n}'
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_gets_the_permissions_open_gives(tmp_path):
    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode


def test_failed_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(3))
    with pytest.raises(RuntimeError), atomic_open(path, "wb") as f:
        f.write(b"\x93NUMPY half")
        raise RuntimeError("killed")
    assert np.load(path).tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["a.npy"]


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    path = tmp_path / "lib.so"
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(".") and tmp.endswith(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"built")
        assert not path.exists()
    assert path.read_bytes() == b"built"


def test_atomic_open_names_the_modes_it_takes(tmp_path):
    mode: Any = "a"
    with (
        pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"),
        atomic_open(tmp_path / "x", mode),
    ):
        pass


def test_pad_rows_appends_fill_rows_and_keeps_the_dtype():
    a = np.arange(6, dtype=np.int16).reshape(3, 2)
    out = pad_rows(a, 5, [7, 8])
    assert out.dtype == np.int16 and out.tolist() == [[0, 1], [2, 3], [4, 5], [7, 8], [7, 8]]
    assert pad_rows(a, 3) is a
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2"):
        pad_rows(a, 2)


def test_bucket_sizes():
    assert [round_up(n, 4) for n in (0, 1, 4, 5)] == [4, 4, 4, 8]
    assert [power_of_two(n) for n in (0, 1, 8, 9, 1000)] == [8, 8, 8, 16, 1024]
