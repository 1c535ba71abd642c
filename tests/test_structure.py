"""One home for each decision: module structure, registry changes, public API.

* every module imports on its own, and the package's import graph has no cycle;
* every way of changing the registry invalidates every choice derived from it;
* the public namespace is what the API page says, and moved names still work
  with a DeprecationWarning.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

import adbackends
from adbackends import registry, selection
from adbackends.backends.loop import LoopBackend
from adbackends.registry import REGISTRY

from .conftest import env_without_backend

PACKAGE = Path(adbackends.__file__).parent


def _modules() -> List[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _imports(module: str) -> Set[str]:
    """Package modules ``module`` imports, at the top or inside functions."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    is_package = spec.origin.endswith("__init__.py")
    base = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for stmt in node.body
        for sub in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # never imported at run time
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("adbackends"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            if not target.startswith("adbackends"):
                continue
            for alias in node.names:  # "from . import selection" names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in ALL_MODULES else target)
    found.discard(module)
    return {m for m in found if m in ALL_MODULES}


ALL_MODULES = _modules()


@pytest.mark.parametrize("module", [m for m in ALL_MODULES if m != "adbackends.__main__"])
def test_each_module_imports_alone(module: str) -> None:
    code = f"import importlib; importlib.import_module({module!r})"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_without_backend(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_the_import_graph_has_no_cycle() -> None:
    graph: Dict[str, Set[str]] = {m: _imports(m) for m in ALL_MODULES}
    # A package's __init__ re-exports its children; importing a child imports
    # the parent package first, which is not a dependency of the child's code.
    for module in ALL_MODULES:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "adbackends":  # the package facade imports everything by design
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    # The checker sees edges: the selection module depends on the registry.
    assert "adbackends.registry" in graph["adbackends.selection"]


#: The declared layers, lowest first. A module imports only from lower layers,
#: and within its own layer only from its own group (the backends package
#: imports its own helpers; the tools import each other).
LAYERS: List[Dict[str, str]] = [
    {"_shared": "leaf", "errors": "leaf", "_version": "leaf"},
    {"_probe_cache": "disk"},
    {"probes": "probes"},
    {"backend": "base"},
    {"_memory": "memory"},
    {"backends": "backends", "fallback": "fallback"},
    {"compiled": "compiled"},
    {"registry": "registry"},
    {"selection": "selection"},
    {"transforms": "transforms"},
    {"": "public", "plugin": "public"},
    {"cli": "tools", "testing": "tools", "pytest_plugin": "tools", "bench": "tools"},
    {"__main__": "tools"},
]


def _place(module: str) -> tuple:
    """(layer, group) of a package module."""
    short = module[len("adbackends.") :] if module != "adbackends" else ""
    for layer, groups in enumerate(LAYERS):
        for prefix, group in groups.items():
            if short == prefix or (prefix == "backends" and short.startswith("backends.")):
                return layer, group
    raise AssertionError(f"{module} has no declared layer: add it to LAYERS")


def test_every_import_goes_down_the_declared_layers() -> None:
    wrong = []
    for module in ALL_MODULES:
        layer, group = _place(module)
        for target in _imports(module):
            if module.startswith(target + "."):
                continue  # a package's parent, imported first by Python itself
            other_layer, other_group = _place(target)
            if other_layer > layer or (other_layer == layer and other_group != group):
                wrong.append(f"{module} (layer {layer}) imports {target} (layer {other_layer})")
    assert not wrong, "imports that go up or across:\n" + "\n".join(wrong)


def test_no_module_reaches_back_through_sys_modules() -> None:
    pattern = re.compile(r"sys\.modules(?:\.get)?\s*[\[(]\s*[\"']adbackends")
    found = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert found == []
    # The check sees such a reach-back where one is written.
    assert pattern.search('registry = sys.modules.get("adbackends.registry")')


def test_backends_know_nothing_above_them() -> None:
    for module in ALL_MODULES:
        if module.startswith("adbackends.backends"):
            assert _imports(module) <= {
                m for m in ALL_MODULES if m.startswith("adbackends.backends")
            } | {
                "adbackends._shared",
                "adbackends.errors",
                "adbackends.backend",
                "adbackends.probes",
                "adbackends._memory",
            }, module


def test_backend_base_class_knows_no_other_backend() -> None:
    assert _imports("adbackends.backend") <= {
        "adbackends._shared",
        "adbackends.errors",
        "adbackends.probes",
    }


def test_the_auto_order_lives_in_selection_only() -> None:
    assert not hasattr(registry, "AUTO_ORDER")
    assert selection.AUTO_ORDER == ("torch.func", "functorch", "loop")


# -- one way to change the registry ------------------------------------------------------


class _A(LoopBackend):
    name = "mine"
    tag = "A"


class _B(LoopBackend):
    name = "mine"
    tag = "B"


@pytest.fixture
def mine():
    yield
    if "mine" in REGISTRY.names():
        REGISTRY.unregister("mine")


@pytest.mark.usefixtures("mine")
def test_every_registry_entry_point_invalidates_the_env_choice(monkeypatch) -> None:
    monkeypatch.setenv(selection.ENV_VAR, "mine")
    adbackends.register("mine", _A)
    assert adbackends.current().tag == "A"
    REGISTRY.register("mine", _B, replace=True)
    assert adbackends.current().tag == "B"
    x = torch.tensor([0.5, 1.0])
    assert torch.allclose(adbackends.jacrev(torch.sin)(x), torch.diag(x.cos()))
    REGISTRY.unregister("mine")
    for call in (adbackends.current, lambda: adbackends.jacrev(torch.sin)):
        with pytest.raises(adbackends.UnknownBackendError, match="TAD_AD_BACKEND"):
            call()
    with pytest.raises(adbackends.UnknownBackendError):
        adbackends.get("mine")


@pytest.mark.usefixtures("mine")
@pytest.mark.parametrize("how", ["use", "using"])
def test_replacing_or_unregistering_is_seen_by_use_and_using(how: str) -> None:
    adbackends.register("mine", _A)
    with adbackends.using("mine") if how == "using" else _used("mine"):
        assert adbackends.current().tag == "A"
        adbackends.register("mine", _B, replace=True)
        assert adbackends.current().tag == "B"
        assert adbackends.explain().source == how
        adbackends.unregister("mine")
        with pytest.raises(adbackends.UnknownBackendError, match=rf"from {how}\(\)"):
            adbackends.vmap(torch.sin)
    adbackends.use(None)
    assert adbackends.current().name.split(">")[0] in selection.AUTO_ORDER


class _used:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        adbackends.use(self.name)

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.usefixtures("mine")
def test_refresh_while_other_threads_select() -> None:
    adbackends.register("mine", _A)
    errors: List[BaseException] = []
    stop = threading.Event()
    x = torch.tensor([0.25, 0.5])

    def select() -> None:
        try:
            while not stop.is_set():
                with adbackends.using("mine"):
                    assert adbackends.current().name == "mine"
                    assert torch.allclose(adbackends.jacrev(torch.sin)(x), torch.diag(x.cos()))
                assert adbackends.current().name.split(">")[0] in selection.AUTO_ORDER
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=select) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(50):
        adbackends.refresh()
        REGISTRY.refresh()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_generation_counts_every_change() -> None:
    start = REGISTRY.generation
    adbackends.register("gen-test", _A.__mro__[1])
    REGISTRY.register("gen-test", LoopBackend, replace=True)
    adbackends.unregister("gen-test")
    adbackends.refresh()
    assert REGISTRY.generation == start + 4


# -- the public API ----------------------------------------------------------------------


def test_public_namespace_is_deliberate() -> None:
    assert sorted(adbackends.__all__) == sorted(
        [
            "Backend",
            "BackendError",
            "BackendUnavailableError",
            "CapabilityError",
            "Choice",
            "ChunkChoice",
            "Compilation",
            "Fallback",
            "FallbackWarning",
            "MemoryWarning",
            "PluginError",
            "Support",
            "UnknownBackendError",
            "__version__",
            "available",
            "chunk_choices",
            "compilations",
            "current",
            "explain",
            "fallbacks",
            "fjacrev",
            "forget_chunks",
            "forget_fallbacks",
            "fvmap",
            "get",
            "grad",
            "grad_and_value",
            "hessian",
            "jacfwd",
            "jacrev",
            "jvp",
            "linearize",
            "max_memory",
            "memory_limit",
            "refresh",
            "register",
            "require",
            "set_max_memory",
            "unregister",
            "use",
            "using",
            "vjp",
            "vmap",
        ]
    )
    for name in adbackends.__all__:
        assert getattr(adbackends, name) is not None


@pytest.mark.parametrize(
    "name, home",
    [
        ("AUTO_ORDER", "selection"),
        ("ENV_VAR", "selection"),
        ("CONTRACT_VERSION", "plugin"),
        ("ENTRY_POINT_GROUP", "plugin"),
        ("PROBES", "plugin"),
        ("REGISTRY", "plugin"),
    ],
)
def test_moved_names_still_work_with_a_deprecation_warning(name: str, home: str) -> None:
    module = importlib.import_module(f"adbackends.{home}")
    with pytest.warns(DeprecationWarning, match=f"adbackends.{home}.{name}") as record:
        value = getattr(adbackends, name)
    assert value is getattr(module, name)
    assert record[0].filename == __file__


def test_required_moved_to_require() -> None:
    with pytest.warns(DeprecationWarning, match=r"adbackends.require\(\)"):
        assert adbackends.REQUIRED == ("custom_function",)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'jacfoo'"):
        adbackends.jacfoo  # noqa: B018


def test_current_explain_true_is_deprecated_but_works() -> None:
    with pytest.warns(DeprecationWarning, match=r"adbackends.explain\(\)") as record:
        choice = adbackends.current(explain=True)
    assert record[0].filename == __file__
    assert choice == adbackends.explain()
    assert isinstance(choice, adbackends.Choice)


# -- required capabilities -----------------------------------------------------------------


def test_require_changes_what_auto_picks() -> None:
    assert adbackends.require() == ("custom_function",)
    before = adbackends.current().name
    assert adbackends.require("legacy_function") == ("custom_function", "legacy_function")
    choice = adbackends.explain()
    assert choice.backend.supports("legacy_function")
    assert "legacy_function" in choice.reason
    for _, why in choice.rejected:
        assert "legacy_function" in why or "does not load" in why or "custom_function" in why
    adbackends.require("custom_function", replace=True)
    assert adbackends.current().name == before


def test_require_applies_to_env_lists_not_to_single_names(monkeypatch) -> None:
    adbackends.require("legacy_function")
    monkeypatch.setenv(selection.ENV_VAR, "torch.func,loop")
    if REGISTRY.failure("torch.func") is None:
        assert adbackends.current().name == "loop"
        monkeypatch.setenv(selection.ENV_VAR, "torch.func")
        assert adbackends.current().name == "torch.func"  # named: honoured, not probed


def test_require_refuses_unknown_capabilities_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match=r"unknown capability 'telepathy'.*legacy_function"):
        adbackends.require("legacy_function", "telepathy")
    assert adbackends.require() == ("custom_function",)


# -- TAD_AD_BACKEND lists ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["loop,", ",loop", " loop , "])
def test_a_trailing_comma_makes_a_probed_list(monkeypatch, value: str) -> None:
    monkeypatch.setenv(selection.ENV_VAR, value)
    choice = adbackends.explain()
    assert choice.backend.name == "loop"
    assert "first usable backend" in choice.reason and "custom_function" in choice.reason


def test_a_list_of_one_that_fails_its_probe_is_an_error(monkeypatch) -> None:
    adbackends.require("transforms")
    monkeypatch.setenv(selection.ENV_VAR, "loop,")
    with pytest.raises(adbackends.BackendError, match="fails probe transforms"):
        adbackends.current()
    monkeypatch.setenv(selection.ENV_VAR, "loop")
    assert adbackends.current().name == "loop"


# -- what a new user hit -----------------------------------------------------------------------


def test_a_built_in_that_does_not_load_is_not_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setitem(registry._BUILTINS, "torch.func", "adb_no_such_module:Backend")
    reg = registry.Registry()
    caplog.set_level(logging.DEBUG, logger="adbackends")
    assert reg.failure("torch.func") is not None
    assert "torch.func" not in reg.available()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_probe_reason_names_the_failure_not_another_capability() -> None:
    class Refuses(LoopBackend):
        name = "refuses"

        def jacrev(self, func, argnums=0, **kwargs):  # type: ignore[override]
            raise adbackends.CapabilityError(self.name, "custom_function", "refuses Functions")

    support = Refuses().supports("legacy_function")
    assert not support
    assert support.reason == "refuses Functions"
    assert "custom_function" not in str(support.reason)


def _legacy_cube():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    return Cube.apply


def _functorch_or_skip():
    failure = REGISTRY.failure("functorch")
    if failure is not None:
        pytest.skip(f"functorch does not load here: {failure.reason}")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hints_name_only_backends_that_can_serve_the_call() -> None:
    _functorch_or_skip()
    cube, x = _legacy_cube(), torch.tensor([0.5, 1.5], dtype=torch.float64)
    with adbackends.using("functorch"):
        with pytest.raises(adbackends.CapabilityError) as info:
            adbackends.jacrev(cube)(x)
        assert "loop" in info.value.alternatives  # jacrev can be served by the loop
        with pytest.raises(adbackends.CapabilityError) as info:
            adbackends.fjacrev(cube)(x)
        assert "loop" not in info.value.alternatives  # fjacrev never is
        assert "'loop'" not in str(info.value)


def test_functorch_deprecation_warning_points_at_the_users_line(monkeypatch) -> None:
    _functorch_or_skip()
    from adbackends._shared import NOTICES

    if not adbackends.get("functorch")._deprecated:
        pytest.skip("this functorch is not deprecated")
    NOTICES.reset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with adbackends.using("functorch"):
            adbackends.jacrev(torch.sin)(torch.ones(2))
    found = [w for w in record if issubclass(w.category, FutureWarning)]
    assert len(found) == 1
    assert found[0].filename == __file__


def test_cut_short_output_ends_quietly() -> None:
    code = (
        "import subprocess, sys;"
        "p = subprocess.Popen([sys.executable, '-m', 'adbackends', '--json'],"
        " stdout=subprocess.PIPE, stderr=subprocess.PIPE);"
        "p.stdout.read(10); p.stdout.close(); err = p.stderr.read(); p.wait();"
        "print(p.returncode); sys.stderr.write(err.decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_without_backend(), capture_output=True, text=True
    )
    assert "Traceback" not in out.stderr, out.stderr
    assert "BrokenPipeError" not in out.stderr
    assert out.stdout.strip() in ("0", "141")  # 0 if it all fit in the pipe's buffer


def test_shared_helpers_are_offered_to_plugin_authors() -> None:
    from adbackends import plugin
    from adbackends.backends import _loop_jacrev, functorch

    assert _loop_jacrev.normalize_argnums is plugin.normalize_argnums
    assert functorch.normalize_argnums is plugin.normalize_argnums
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name


def test_environment_is_untouched_by_selection() -> None:
    assert os.environ.get(selection.ENV_VAR) is None
    assert adbackends.current().name.split(">")[0] in selection.AUTO_ORDER
