"""Sphinx configuration for the adbackends documentation.

Build the site with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
and run every example with ``python -m sphinx -W --keep-going -b doctest docs
docs/_build/doctest``.
"""

from __future__ import annotations

import adbackends

project = "adbackends"
author = "adbackends developers"
copyright = "adbackends developers"  # noqa: A001 (Sphinx's name for it)
release = adbackends.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build"]
root_doc = "index"
default_role = "code"

# -- cross references --------------------------------------------------------

# A reference to a name that is not documented here fails the -W build.
nitpicky = True
# Names from outside this project. There is no network during the build, so
# intersphinx cannot resolve them; they are rendered as plain text instead.
nitpick_ignore = [
    # torch's own classes, in signatures and docstrings: no intersphinx
    # inventory can be fetched, so they are shown as plain names.
    ("py:class", "torch.Tensor"),
    ("py:class", "Tensor"),
]

# -- autodoc and napoleon ----------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Render "name : type" as text: numpydoc types such as "callable" or "int or
# a pytree prefix of the arguments" are prose, not names to link.
napoleon_use_param = False

# -- doctest -----------------------------------------------------------------

# Every example starts from the state a fresh program sees: no TAD_AD_BACKEND,
# no use(). The outputs shown are the same on torch.func and on loop.
doctest_global_setup = """
import os
os.environ.pop("TAD_AD_BACKEND", None)
import torch
import adbackends
adbackends.use(None)
"""
doctest_global_cleanup = """
os.environ.pop("TAD_AD_BACKEND", None)
adbackends.use(None)
"""
# ``>>>`` examples in docstrings pulled in by autodoc run too.
doctest_test_doctest_blocks = "default"

# -- HTML --------------------------------------------------------------------

html_theme = "furo"
html_title = f"adbackends {release}"
html_static_path: list[str] = []
