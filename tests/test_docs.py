"""The documentation builds with Sphinx, warnings as errors.

The guides in ``docs/`` are MyST markdown; the API pages are generated from the
docstrings, so a docstring that does not parse, a page missing from the table of contents or
a broken cross-reference fails here, in the same run as the tests. (The docstrings' examples
run as doctests in the same suite: ``--doctest-modules``.)
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    build = [
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(ROOT / "docs"),
        str(tmp_path / "html"),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", *build],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "html" / "api" / "core.html").exists()
