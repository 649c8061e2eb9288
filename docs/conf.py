"""Sphinx configuration: the guides are MyST markdown, the API pages come from the
docstrings (autodoc + napoleon, Google style). Built by ``tests/test_docs.py`` with warnings
as errors: ``sphinx-build -W -b html docs docs/_build/html``."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "spp_jax"
author = "the spp_jax authors"
copyright = "2026, the spp_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo" if __import__("importlib").util.find_spec("furo") else "alabaster"
html_title = "spp_jax"
