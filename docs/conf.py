"""Sphinx configuration for the adbackends documentation.

Build the site with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
and run every example with ``python -m sphinx -W --keep-going -b doctest docs
docs/_build/doctest``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import adbackends

project = "adbackends"
author = "adbackends developers"
copyright = "adbackends developers"
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
# Only names from outside this project belong here. The build has no
# network, so intersphinx cannot resolve torch's names: they stay plain text.
nitpick_ignore = [
    ("py:class", "torch.Tensor"),
    ("py:class", "Tensor"),
]
# Annotations written inside a module name its classes unqualified; these are
# documented under their full names.
nitpick_ignore += [("py:class", "Peers")]

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
# The examples never read or write the reader's probe cache on disk.
os.environ["ADBACKENDS_NO_CACHE"] = "1"
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
html_static_path: List[str] = []


# -- attribute docstrings ----------------------------------------------------

# Napoleon reads the first line of an attribute's docstring as "type: text",
# so ``#: Where it comes from: "built-in", ...`` would document an attribute
# of type "Where it comes from". Attribute comments here are prose (types come
# from the annotations): they are kept out of napoleon's hands, unless they
# hold a numpy-style section.
_ATTRIBUTE_KINDS = ("attribute", "data", "property")
_prose: Dict[str, List[str]] = {}


def _has_section(lines: List[str]) -> bool:
    return any(line.strip() and set(line.strip()) == {"-"} for line in lines)


def _before_napoleon(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: List[str]
) -> None:
    if what in _ATTRIBUTE_KINDS and not _has_section(lines):
        _prose[name] = list(lines)


def _after_napoleon(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: List[str]
) -> None:
    if name in _prose:
        lines[:] = _prose.pop(name)


def setup(app: Any) -> None:
    # Napoleon's handler runs at the default priority, 500.
    app.connect("autodoc-process-docstring", _before_napoleon, priority=400)
    app.connect("autodoc-process-docstring", _after_napoleon, priority=600)
