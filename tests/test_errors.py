"""Bad names and broken backends give clear errors through every path."""

from __future__ import annotations

import pytest
import torch

import adbackends
from adbackends import selection
from adbackends.registry import REGISTRY

BUILTIN = ("torch.func", "functorch", "loop")


def _select_with_use(name):
    adbackends.use(name)


def _select_with_using(name):
    with adbackends.using(name):
        pass


def _select_with_get(name):
    adbackends.get(name)


def _select_with_env(name, monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, name)
    adbackends.jacrev(torch.sin)


def _select_with_env_list(name, monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, f"loop,{name}")
    adbackends.current()


PATHS = {
    "use()": _select_with_use,
    "using()": _select_with_using,
    "get()": _select_with_get,
    "TAD_AD_BACKEND": _select_with_env,
    "TAD_AD_BACKEND list": _select_with_env_list,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    ("bad", "nearest"),
    [("lop", "loop"), ("torch_func", "torch.func"), ("functorc", "functorch"), ("jax", None)],
)
def test_unknown_name_lists_valid_names_and_nearest(path, bad, nearest, monkeypatch):
    select = PATHS[path]
    with pytest.raises(adbackends.UnknownBackendError) as info:
        if path.startswith("TAD_AD_BACKEND"):
            select(bad, monkeypatch)
        else:
            select(bad)
    err = info.value
    message = str(err)
    assert err.name == bad and repr(bad) in message
    for name in (*BUILTIN, "auto"):
        assert repr(name) in message
    assert err.suggestion == nearest
    if nearest:
        assert f"Did you mean {nearest!r}?" in message
    assert path.split()[0] in message  # says where the name came from
    # Catchable as the built-in type users reach for, and as the base class.
    assert isinstance(err, ValueError) and isinstance(err, adbackends.BackendError)


@pytest.mark.parametrize("path", ["use()", "using()", "get()"])
@pytest.mark.parametrize("bad", ["", "   "])
def test_blank_name_is_an_unknown_name(path, bad):
    with pytest.raises(adbackends.UnknownBackendError, match="Valid names"):
        PATHS[path](bad)


@pytest.mark.parametrize("path", ["use()", "using()", "get()"])
@pytest.mark.parametrize("bad", [3, ["loop"], b"loop"])
def test_non_string_name_is_a_type_error(path, bad):
    with pytest.raises(TypeError, match="must be a str"):
        PATHS[path](bad)


def test_bad_use_keeps_the_previous_choice():
    adbackends.use("loop")
    with pytest.raises(adbackends.UnknownBackendError):
        adbackends.use("nope")
    assert adbackends.current().name == "loop"


def test_names_are_case_sensitive_but_suggested():
    with pytest.raises(adbackends.UnknownBackendError) as info:
        adbackends.get("LOOP")
    assert info.value.suggestion == "loop"


class _Broken(adbackends.Backend):
    install_hint = "pip install the-missing-thing"

    def load(self) -> None:
        import adbackends_module_that_does_not_exist  # noqa: F401


@pytest.fixture
def broken():
    adbackends.register("broken", _Broken)
    yield "broken"
    REGISTRY.unregister("broken")


@pytest.mark.parametrize("path", ["use()", "using()", "get()"])
def test_backend_that_does_not_load_says_why_and_what_to_install(broken, path):
    with pytest.raises(adbackends.BackendUnavailableError) as info:
        PATHS[path](broken)
    err = info.value
    assert "adbackends_module_that_does_not_exist" in err.reason
    assert err.hint == "pip install the-missing-thing"
    assert "pip install the-missing-thing" in str(err)
    assert isinstance(err.__cause__, ImportError)
    assert isinstance(err, ImportError)


def test_unavailable_backend_in_env_list_is_skipped_with_reason(broken, monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, f"{broken},loop")
    choice = adbackends.explain()
    assert choice.backend.name == "loop"
    assert choice.rejected[0][0] == broken
    assert "does not load" in choice.rejected[0][1]


def test_env_list_with_no_usable_backend(broken, monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, f"{broken}, {broken}")
    with pytest.raises(adbackends.BackendError, match="no usable autodiff backend"):
        adbackends.current()


def test_capability_error_names_probe_reason_and_alternatives():
    err = adbackends.CapabilityError(
        "functorch",
        "chunk_size",
        "functorch 0.2.1 has no jacrev(chunk_size=...)",
        ["loop"],
        detail="jacrev(chunk_size=2)",
    )
    message = str(err)
    for part in ("'functorch'", "'chunk_size'", "0.2.1", "'loop'", "jacrev(chunk_size=2)"):
        assert part in message
    assert isinstance(err, RuntimeError) and isinstance(err, adbackends.BackendError)


def test_unknown_capability_name():
    with pytest.raises(ValueError, match="custom_function"):
        adbackends.get("loop").supports("custom_functions")


@pytest.mark.parametrize("name", ["torch.func", "loop", "auto", "a,b", ""])
def test_register_refuses_reserved_or_malformed_names(name):
    with pytest.raises(ValueError):
        adbackends.register(name, _Broken)
