"""The conformance kit: does a backend behave as the documented transforms do?

:func:`check_backend` runs a fixed list of small cases on a backend: the
examples of the ``jacrev`` and ``vmap`` documentation (values, shapes, pytree
structures, ``argnums``, ``has_aux``, ``in_dims``/``out_dims``, kwargs,
``chunk_size``, randomness, nesting, ``torch.no_grad`` inside and outside),
the rest of the family (``grad``, ``grad_and_value``, ``vjp``, ``jvp``,
``jacfwd``, ``hessian``, ``linearize`` and their compositions), the
exception types raised for bad arguments, and every capability the
backend claims in ``Backend.claims``. Values are compared with closed-form
answers and with a reference backend (torch.func, or the loop backend where
torch.func does not load), within stated tolerances; exception types are
those the reference raises.

It is usable three ways: ``python -m adbackends check NAME`` (exit status 0
when it passes, 1 when not); ``adbackends.testing.check_backend(backend)``
from a plugin's own tests; and ``pytest --ad-backend NAME`` (the
``adbackends`` pytest plugin) to run any test suite under a chosen backend.

Values must agree to ``rtol=1e-7, atol=1e-10`` in float64 by default (exact
backends agree to rounding). A backend that is approximate by design states
its own tolerance as ``tolerance = (rtol, atol)``; the kit, the capability
probes and ``python -m adbackends`` all use it, and the report prints the
tolerances used.

A transform the backend neither implements nor gets derived (``vjp``,
``jvp`` and ``linearize`` of a backend written for contract 1, see
:meth:`adbackends.Backend.transforms`) is a skip with that reason, not a
failure.

A backend may declare, in ``limitations = {check: reason}``, that it cannot
honour one of the few semantic checks listed in ``WAIVABLE`` (a finite
difference cannot see ``torch.no_grad`` inside the function). Such a check
still runs; a failure is reported as ``waived`` with the reason instead of
failing the backend. No other check can be waived.

Examples
--------
>>> import adbackends
>>> from adbackends.testing import check_backend
>>> report = check_backend("loop")
>>> report.ok
True
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Type, Union

from ._shared import check_capability_names, summarize_exception
from .backend import Backend

__all__ = [
    "CHECKS",
    "DEFAULT_TOLERANCE",
    "LOW_PRECISION_TOLERANCE",
    "WAIVABLE",
    "CheckResult",
    "ConformanceError",
    "ConformanceReport",
    "check_backend",
    "reset_state",
]

#: (rtol, atol) for float64 values when the backend states no tolerance.
DEFAULT_TOLERANCE: Tuple[float, float] = (1e-7, 1e-10)

#: The least (rtol, atol) used for float32 and other low-precision values.
LOW_PRECISION_TOLERANCE: Tuple[float, float] = (1e-5, 1e-6)

#: Checks a backend may declare, in ``Backend.limitations``, that it cannot pass.
WAIVABLE: Dict[str, str] = {
    "jacrev_inner_no_grad": "torch.no_grad/detach inside the function stop differentiation",
}


def reset_state() -> None:
    """Forget everything this process has chosen or remembered, as a new process would.

    Each piece of state has one owner, and this asks each to reset:
    selection (``use()``, ``require()`` and every cached choice), the
    probes' answers in memory (:data:`adbackends.probes.STORE`; the file on
    disk is kept), the fallback log with the transforms the chains built
    (:data:`adbackends.fallback.LOG`), the memory limit set for the process
    with the chunks chosen under it, the compiled tier's variants and
    settings, and the one-time notices. Installed
    plugins and loaded backends stay. For tests that need a clean start.

    Examples
    --------
    >>> import adbackends
    >>> from adbackends.testing import reset_state
    >>> _ = adbackends.use("loop")
    >>> reset_state()
    >>> adbackends.explain().source
    'auto'
    """
    from . import _memory, compiled, selection
    from ._shared import NOTICES
    from .fallback import LOG
    from .probes import STORE

    selection._reset()
    _memory.reset()
    compiled.reset()
    STORE.forget()
    LOG.reset()
    NOTICES.reset()


class CheckResult(NamedTuple):
    """The outcome of one check.

    Attributes
    ----------
    name : str
        The check's name (``"jacrev_basic"``, ``"claim:custom_function"``, ...).
    status : str
        ``"pass"``, ``"fail"``, ``"skip"`` or ``"waived"``.
    detail : str
        Why it failed, was skipped or waived; empty when it passed.
    seconds : float
        How long it took.
    """

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


class ConformanceError(AssertionError):
    """A backend failed the conformance kit; the message is the report's summary.

    Attributes
    ----------
    report : ConformanceReport
        Every check's result.
    """

    def __init__(self, report: ConformanceReport) -> None:
        self.report = report
        super().__init__(report.summary())


class ConformanceReport(NamedTuple):
    """Every check's result for one backend.

    Attributes
    ----------
    backend : str
        The name of the backend checked.
    reference : str
        The backend values and exception types were compared with.
    rtol, atol : float
        The tolerances used for float64 values.
    results : list of CheckResult
        One per check, in order.
    capabilities : dict
        Every probe's verdict for the backend, ``{name: (ok, reason)}``.
    """

    backend: str
    reference: str
    rtol: float
    atol: float
    results: List[CheckResult]
    capabilities: Dict[str, Tuple[bool, Optional[str]]]

    @property
    def ok(self) -> bool:
        """Whether no check failed."""
        return not self.failures

    @property
    def failures(self) -> List[CheckResult]:
        """The checks that failed."""
        return [r for r in self.results if r.status == "fail"]

    def summary(self) -> str:
        """A readable report: one line per check, failures with their reasons."""
        counts: Dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        verdict = "PASSED" if self.ok else "FAILED"
        tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines = [
            f"conformance of backend {self.backend!r} against {self.reference!r} "
            f"(rtol={self.rtol:g}, atol={self.atol:g}): {verdict} ({tally})"
        ]
        marks = {"pass": "ok  ", "fail": "FAIL", "skip": "skip", "waived": "waiv"}
        for r in self.results:
            line = f"  {marks.get(r.status, r.status)} {r.name}"
            if r.detail:
                line += f": {r.detail}"
            lines.append(line)
        lines.append(
            "  capabilities (probed): "
            + ", ".join(
                f"{cap}={'yes' if ok else 'no'}" for cap, (ok, _) in self.capabilities.items()
            )
        )
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain data (what ``check --json`` prints)."""
        return {
            "backend": self.backend,
            "reference": self.reference,
            "rtol": self.rtol,
            "atol": self.atol,
            "ok": self.ok,
            "results": [r._asdict() for r in self.results],
            "capabilities": {
                cap: {"ok": ok, "reason": reason} for cap, (ok, reason) in self.capabilities.items()
            },
        }


class _Skip(Exception):
    """Raised by a check that does not apply here."""


class _Context:
    """What every check needs: the two backends, tolerances and comparisons."""

    def __init__(self, backend: Backend, reference: Backend, rtol: float, atol: float) -> None:
        import torch

        self.torch = torch
        self.backend = backend
        self.reference = reference
        self.rtol = rtol
        self.atol = atol
        self._generator = torch.Generator().manual_seed(20240611)

    def randn(self, *shape: int) -> Any:
        """Reproducible float64 inputs that leave the global RNG alone."""
        return self.torch.randn(*shape, generator=self._generator, dtype=self.torch.float64)

    def close(self, actual: Any, expected: Any, what: str) -> None:
        """``actual`` has ``expected``'s pytree structure, shapes, dtypes and values.

        Tolerances are the context's for float64; lower precisions get at
        least :data:`LOW_PRECISION_TOLERANCE`.
        """
        torch = self.torch
        if isinstance(expected, torch.Tensor):
            if not isinstance(actual, torch.Tensor):
                raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
            if actual.shape != expected.shape:
                raise AssertionError(
                    f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
                )
            if actual.dtype != expected.dtype:
                raise AssertionError(f"{what}: dtype {actual.dtype}, expected {expected.dtype}")
            rtol, atol = self.rtol, self.atol
            if expected.dtype not in (torch.float64, torch.complex128):
                rtol = max(rtol, LOW_PRECISION_TOLERANCE[0])
                atol = max(atol, LOW_PRECISION_TOLERANCE[1])
            a, e = actual.detach(), expected.detach()
            if not torch.allclose(a, e, rtol=rtol, atol=atol):
                err = (a - e).abs().max().item()
                raise AssertionError(
                    f"{what}: values differ by up to {err:.3g} (rtol={rtol:g}, atol={atol:g})"
                )
            return
        if type(actual) is not type(expected):
            raise AssertionError(
                f"{what}: a {type(actual).__name__}, expected a {type(expected).__name__}"
            )
        if isinstance(expected, dict):
            if sorted(actual, key=repr) != sorted(expected, key=repr):
                raise AssertionError(
                    f"{what}: keys {sorted(actual, key=repr)}, expected "
                    f"{sorted(expected, key=repr)}"
                )
            for key in expected:
                self.close(actual[key], expected[key], f"{what}[{key!r}]")
        elif isinstance(expected, (tuple, list)):
            if len(actual) != len(expected):
                raise AssertionError(f"{what}: length {len(actual)}, expected {len(expected)}")
            for i, (a, e) in enumerate(zip(actual, expected)):
                self.close(a, e, f"{what}[{i}]")
        elif actual != expected:
            raise AssertionError(f"{what}: {actual!r}, expected {expected!r}")

    def both(self, what: str, run: Callable[[Backend], Any], expected: Any = None) -> Any:
        """Run ``run`` on the backend and the reference; they (and ``expected``) agree."""
        got = run(self.backend)
        if self.reference is not self.backend:
            self.close(got, run(self.reference), f"{what} vs {self.reference.name}")
        if expected is not None:
            self.close(got, expected, f"{what} vs closed form")
        return got

    def raises_like_reference(self, what: str, run: Callable[[Backend], Any]) -> None:
        """The backend raises the exception type the reference raises for ``run``."""
        try:
            run(self.reference)
        except Exception as exc:
            expected: Type[BaseException] = type(exc)
        else:
            raise _Skip(f"{what}: the reference {self.reference.name} does not raise")
        try:
            run(self.backend)
        except expected:
            return
        except Exception as exc:
            raise AssertionError(
                f"{what}: raised {summarize_exception(exc)}, expected "
                f"{expected.__name__} as {self.reference.name} raises"
            ) from None
        raise AssertionError(f"{what}: raised nothing, expected {expected.__name__}")


# -- jacrev ---------------------------------------------------------------------


def _jacrev_basic(c: _Context) -> None:
    x = c.randn(5)
    c.both("jacrev(sin)", lambda b: b.jacrev(c.torch.sin)(x), c.torch.diag(x.cos()))
    m = c.randn(2, 3)
    c.both(
        "jacrev of a matrix function",
        lambda b: b.jacrev(lambda t: (t**2).sum(0))(m),
        _sum0_square_jacobian(c, m),
    )


def _sum0_square_jacobian(c: _Context, m: Any) -> Any:
    """d/dm_ij of sum_k m_kj**2 = 2 m_ij where j is the output index."""
    torch = c.torch
    out = torch.zeros(3, 2, 3, dtype=m.dtype)
    for j in range(3):
        out[j, :, j] = 2 * m[:, j]
    return out


def _jacrev_has_aux(c: _Context) -> None:
    x = c.randn(4)

    def g(t: Any) -> Any:
        s = t.sin()
        return s, {"value": s, "note": (t.cos(),)}

    jac, aux = c.both("jacrev(has_aux=True)", lambda b: b.jacrev(g, has_aux=True)(x))
    c.close(jac, c.torch.diag(x.cos()), "jacobian")
    c.close(aux, {"value": x.sin(), "note": (x.cos(),)}, "aux")


def _jacrev_argnums(c: _Context) -> None:
    x, y = c.randn(5), c.randn(5)

    def f(a: Any, b: Any) -> Any:
        return a + b**2

    eye = c.torch.eye(5, dtype=x.dtype)
    c.both("argnums=1", lambda b: b.jacrev(f, argnums=1)(x, y), c.torch.diag(2 * y))
    c.both("argnums=-1", lambda b: b.jacrev(f, argnums=-1)(x, y), c.torch.diag(2 * y))
    c.both(
        "argnums=(0, 1)",
        lambda b: b.jacrev(f, argnums=(0, 1))(x, y),
        (eye, c.torch.diag(2 * y)),
    )
    c.both("argnums=(1,)", lambda b: b.jacrev(f, argnums=(1,))(x, y), (c.torch.diag(2 * y),))


def _jacrev_pytrees(c: _Context) -> None:
    x, y = c.randn(3), c.randn(2)

    def f(inp: Any, scale: Any) -> Any:
        a, b = inp["a"], inp["b"]
        return {"sum": (a * b.sum()).sum() * scale, "pair": (a**2, b * 3.0)}

    def run(b: Backend) -> Any:
        return b.jacrev(f)({"a": x, "b": y}, 2.0)

    torch = c.torch
    z3, z2 = torch.zeros, torch.zeros
    expected = {
        "sum": {"a": 2.0 * y.sum().expand(3), "b": 2.0 * x.sum().expand(2)},
        "pair": (
            {"a": torch.diag(2 * x), "b": z3(3, 2, dtype=x.dtype)},
            {"a": z2(2, 3, dtype=x.dtype), "b": 3.0 * torch.eye(2, dtype=x.dtype)},
        ),
    }
    c.both("dict input, dict/tuple output", run, expected)


def _jacrev_chunk_size(c: _Context) -> None:
    x = c.randn(5)
    for size in (1, 2, 5, 7):
        c.both(
            f"jacrev(chunk_size={size})",
            functools.partial(_jacobian_in_chunks, x=x, size=size),
            c.torch.diag(x.cos()),
        )


def _jacobian_in_chunks(b: Backend, x: Any, size: int) -> Any:
    import torch

    return b.jacrev(torch.sin, chunk_size=size)(x)


def _jacrev_inner_no_grad(c: _Context) -> None:
    x = c.randn(4)

    def f(t: Any) -> Any:
        with c.torch.no_grad():
            square = t**2
        return t - square + t.detach() * 0.5

    c.both("no_grad inside f", lambda b: b.jacrev(f)(x), c.torch.eye(4, dtype=x.dtype))


def _jacrev_outer_no_grad(c: _Context) -> None:
    x = c.randn(4)
    with c.torch.no_grad():
        jac = c.both(
            "jacrev under torch.no_grad", lambda b: b.jacrev(c.torch.sin)(x), c.torch.diag(x.cos())
        )
    if jac.requires_grad:
        raise AssertionError("jacrev under torch.no_grad returned a tensor that requires grad")


def _jacrev_differentiable(c: _Context) -> None:
    torch = c.torch
    x = c.randn(4)
    w = c.randn(4).requires_grad_(True)

    def grad_of_jacobian(b: Backend) -> Any:
        jac = b.jacrev(lambda t: (w * t).sin())(x)
        if not jac.requires_grad:
            raise AssertionError("the Jacobian of a function of a parameter is not differentiable")
        (grad,) = torch.autograd.grad(jac.sum(), w)
        return grad

    # d/dw sum_i w_i cos(w_i x_i) = cos(w x) - w x sin(w x)
    wd = w.detach()
    expected = (wd * x).cos() - wd * x * (wd * x).sin()
    c.both("d/dw of jacrev(f)(x) through closed-over w", grad_of_jacobian, expected)
    jac = c.backend.jacrev(torch.sin)(x)
    if jac.requires_grad:
        raise AssertionError(
            "the Jacobian of a function of nothing that requires grad requires grad"
        )


def _hessian(c: _Context) -> None:
    x = c.randn(5)
    c.both(
        "jacrev(jacrev(f))",
        lambda b: b.jacrev(b.jacrev(lambda t: t.sin().sum()))(x),
        c.torch.diag(-x.sin()),
    )
    c.both(
        "jacrev over a closure of the outer variable",
        lambda b: b.jacrev(lambda u: b.jacrev(lambda v: (u * v).sum())(u))(x),
        c.torch.eye(5, dtype=x.dtype),
    )


def _vmap_jacrev(c: _Context) -> None:
    xs = c.randn(6, 5)
    c.both(
        "vmap(jacrev(sin))",
        lambda b: b.vmap(b.jacrev(c.torch.sin))(xs),
        c.torch.diag_embed(xs.cos()),
    )


# -- vmap -------------------------------------------------------------------------


def _vmap_basic(c: _Context) -> None:
    x, y = c.randn(3, 5), c.randn(3, 5)
    c.both("vmap(dot)", lambda b: b.vmap(c.torch.dot)(x, y), (x * y).sum(1))
    a, d = c.randn(2, 3, 5), c.randn(2, 3, 5)
    c.both("vmap(vmap(dot))", lambda b: b.vmap(b.vmap(c.torch.dot))(a, d), (a * d).sum(2))


def _vmap_in_dims(c: _Context) -> None:
    x, y = c.randn(5, 2), c.randn(5, 2)
    c.both("in_dims=1", lambda b: b.vmap(c.torch.dot, in_dims=1)(x, y), (x * y).sum(0))
    v = c.randn(5)
    c.both(
        "in_dims=(0, None)",
        lambda b: b.vmap(c.torch.dot, in_dims=(0, None))(x.T.contiguous(), v),
        x.T @ v,
    )
    xs = c.randn(2, 5)
    c.both(
        "in_dims with a dict",
        lambda b: b.vmap(lambda d: c.torch.dot(d["x"], d["y"]), in_dims=({"x": 0, "y": None},))(
            {"x": xs, "y": v}
        ),
        xs @ v,
    )


def _vmap_out_dims(c: _Context) -> None:
    x = c.randn(2, 5)
    c.both("out_dims=1", lambda b: b.vmap(lambda t: t**2, out_dims=1)(x), (x**2).T)
    c.both(
        "out_dims=(1, 0) with two outputs",
        lambda b: b.vmap(lambda t: (t * 2, t.sum()), out_dims=(1, 0))(x),
        ((x * 2).T, x.sum(1)),
    )
    c.both(
        "pytree outputs",
        lambda b: b.vmap(lambda t: {"s": t.sin(), "l": [t.cos()]})(x),
        {"s": x.sin(), "l": [x.cos()]},
    )


def _vmap_kwargs(c: _Context) -> None:
    x = c.randn(2, 5)

    def fn(t: Any, scale: Any = 4.0) -> Any:
        return t * scale

    c.both("default kwarg", lambda b: b.vmap(fn)(x), x * 4)
    out = c.both("kwarg is not batched", lambda b: b.vmap(fn)(x, scale=x))
    if tuple(out.shape) != (2, 2, 5):
        raise AssertionError(
            f"vmap(fn)(x, scale=x) has shape {tuple(out.shape)}, expected (2, 2, 5)"
        )


def _vmap_chunk_size(c: _Context) -> None:
    x = c.randn(5, 3)
    for size in (1, 2, 5, 9):
        c.both(
            f"vmap(chunk_size={size})",
            functools.partial(_map_in_chunks, x=x, size=size),
            x.sin(),
        )


def _map_in_chunks(b: Backend, x: Any, size: int) -> Any:
    import torch

    return b.vmap(torch.sin, chunk_size=size)(x)


def _vmap_randomness(c: _Context) -> None:
    torch = c.torch
    base = torch.zeros(4, dtype=torch.float64)
    state = torch.random.get_rng_state()
    try:

        def noisy(t: Any) -> Any:
            return t + torch.rand((), dtype=torch.float64)

        same = c.backend.vmap(noisy, randomness="same")(base)
        if not bool((same == same[0]).all()):
            raise AssertionError("randomness='same' gave different draws per sample")
        different = c.backend.vmap(noisy, randomness="different")(base)
        if len(set(different.tolist())) != len(different):
            raise AssertionError("randomness='different' repeated a draw")
        c.raises_like_reference(
            "randomness='error' with a random op", lambda b: b.vmap(noisy)(base)
        )
    finally:
        torch.random.set_rng_state(state)


# -- errors -------------------------------------------------------------------------


def _errors(c: _Context) -> None:
    torch = c.torch
    x, y = c.randn(3), c.randn(3)
    cases: List[Tuple[str, Callable[[Backend], Any]]] = [
        ("jacrev argnums out of range", lambda b: b.jacrev(torch.sin, argnums=1)(x)),
        ("jacrev argnums not an int", lambda b: b.jacrev(torch.sin, argnums=0.0)(x)),  # type: ignore[arg-type]
        ("jacrev empty argnums", lambda b: b.jacrev(torch.add, argnums=())(x, y)),
        ("jacrev repeated argnums", lambda b: b.jacrev(torch.add, argnums=(0, 0))(x, y)),
        ("jacrev chunk_size=0", lambda b: b.jacrev(torch.sin, chunk_size=0)(x)),
        ("jacrev of an integer tensor", lambda b: b.jacrev(torch.sin)(torch.arange(3))),
        ("jacrev non-tensor output", lambda b: b.jacrev(lambda t: 1.0)(x)),
        ("jacrev has_aux without a pair", lambda b: b.jacrev(torch.sin, has_aux=True)(x)),
        ("vmap batch sizes differ", lambda b: b.vmap(torch.add)(x, c.randn(4))),
        ("vmap in_dims out of range", lambda b: b.vmap(torch.sin, in_dims=1)(x)),
        ("vmap in_dims of wrong length", lambda b: b.vmap(torch.add, in_dims=(0,))(x, y)),
        ("vmap non-tensor output", lambda b: b.vmap(lambda t: 1.0)(x)),
        ("vmap without a batched input", lambda b: b.vmap(torch.sin, in_dims=None)(x)),
        ("vmap bad randomness", lambda b: b.vmap(torch.sin, randomness="sometimes")(x)),
        ("vmap chunk_size=0", lambda b: b.vmap(torch.sin, chunk_size=0)(x)),
    ]
    problems = []
    for what, run in cases:
        try:
            c.raises_like_reference(what, run)
        except AssertionError as exc:
            problems.append(str(exc))
        except _Skip:
            pass
    if problems:
        raise AssertionError("; ".join(problems))


# -- the rest of the family -----------------------------------------------------------


def _needs(c: _Context, *transforms: str) -> None:
    """Skip a check that uses a transform the backend does not have at all."""
    ways = c.backend.transforms()
    missing = [t for t in transforms if ways.get(t) == "missing"]
    if missing:
        raise _Skip(
            f"backend {c.backend.name!r} (contract {c.backend.contract}) has no "
            f"{', '.join(missing)}"
        )


def _grad(c: _Context) -> None:
    torch = c.torch
    x, y = c.randn(4), c.randn(4)

    def f(a: Any, b: Any, scale: float = 1.0) -> Any:
        return (a.sin() * b).sum() * scale

    c.both("grad", lambda b: b.grad(f)(x, y), x.cos() * y)
    c.both("grad(argnums=1) with a kwarg", lambda b: b.grad(f, 1)(x, y, scale=2.0), 2 * x.sin())
    c.both("grad(argnums=(0, 1))", lambda b: b.grad(f, (0, 1))(x, y), (x.cos() * y, x.sin()))
    c.both(
        "grad_and_value",
        lambda b: b.grad_and_value(f)(x, y),
        (x.cos() * y, (x.sin() * y).sum()),
    )

    def g(a: Any) -> Any:
        return (a**2).sum(), {"double": 2 * a}

    c.both("grad(has_aux=True)", lambda b: b.grad(g, has_aux=True)(x), (2 * x, {"double": 2 * x}))
    c.both(
        "grad_and_value(has_aux=True)",
        lambda b: b.grad_and_value(g, has_aux=True)(x),
        (2 * x, ((x**2).sum(), {"double": 2 * x})),
    )
    with torch.no_grad():
        out = c.both("grad under torch.no_grad", lambda b: b.grad(f)(x, y), x.cos() * y)
    if out.requires_grad:
        raise AssertionError("grad under torch.no_grad returned a tensor that requires grad")


def _vjp(c: _Context) -> None:
    _needs(c, "vjp")
    x, y = c.randn(3), c.randn(3)
    ct = c.randn(3)

    def f(a: Any, b: Any) -> Any:
        return a.sin() * b

    def run(b: Backend) -> Any:
        out, vjp_fn = b.vjp(f, x, y)
        return out, vjp_fn(ct)

    c.both("vjp", run, (x.sin() * y, (ct * x.cos() * y, ct * x.sin())))

    def with_aux(b: Backend) -> Any:
        out, vjp_fn, aux = b.vjp(lambda a: (a**2, a.cos()), x, has_aux=True)
        return out, vjp_fn(ct), aux

    c.both("vjp(has_aux=True)", with_aux, (x**2, (2 * x * ct,), x.cos()))


def _jvp(c: _Context) -> None:
    _needs(c, "jvp")
    x, v = c.randn(3), c.randn(3)
    c.both("jvp", lambda b: b.jvp(lambda a: a.sin(), (x,), (v,)), (x.sin(), x.cos() * v))
    c.both(
        "jvp with a tuple output, has_aux",
        lambda b: b.jvp(lambda a: ((a**2, a.exp()), a.cos()), (x,), (v,), has_aux=True),
        ((x**2, x.exp()), (2 * x * v, x.exp() * v), x.cos()),
    )


def _linearize(c: _Context) -> None:
    _needs(c, "linearize")
    x, v = c.randn(3), c.randn(3)

    def run(b: Backend) -> Any:
        out, jvp_fn = b.linearize(lambda a: a.sin() * a, x)
        return out, jvp_fn(v), jvp_fn(2 * v)

    d = x.cos() * x + x.sin()
    c.both("linearize", run, (x.sin() * x, d * v, 2 * d * v))


def _jacfwd(c: _Context) -> None:
    torch = c.torch
    x, y = c.randn(4), c.randn(4)
    c.both("jacfwd(sin)", lambda b: b.jacfwd(torch.sin)(x), torch.diag(x.cos()))
    c.both(
        "jacfwd(argnums=(0, 1))",
        lambda b: b.jacfwd(lambda a, w: a * w, (0, 1))(x, y),
        (torch.diag(y), torch.diag(x)),
    )
    c.both(
        "jacfwd(has_aux=True)",
        lambda b: b.jacfwd(lambda a: (a**2, a.sum()), has_aux=True)(x),
        (torch.diag(2 * x), x.sum()),
    )


def _hessian_transform(c: _Context) -> None:
    torch = c.torch
    x, y = c.randn(4), c.randn(2)
    c.both("hessian", lambda b: b.hessian(lambda t: t.sin().sum())(x), torch.diag(-x.sin()))
    eye = torch.eye(4, dtype=x.dtype)
    c.both(
        "hessian(argnums=(0, 1))",
        lambda b: b.hessian(lambda a, w: (a**2).sum() * w.sum(), (0, 1))(x, y),
        (
            (2 * y.sum() * eye, (2 * x)[:, None].expand(4, 2)),
            ((2 * x)[None, :].expand(2, 4), torch.zeros(2, 2, dtype=x.dtype)),
        ),
    )


def _family_compositions(c: _Context) -> None:
    torch = c.torch
    xs = c.randn(3, 4)
    x, v = xs[0], c.randn(4)

    def energy(t: Any) -> Any:
        return (t.sin() ** 2).sum()

    d1 = 2 * xs.sin() * xs.cos()  # d/dx sin^2 = sin(2x)
    d2 = 2 * (xs.cos() ** 2 - xs.sin() ** 2)  # = 2 cos(2x)
    c.both("vmap(grad)", lambda b: b.vmap(b.grad(energy))(xs), d1)
    c.both(
        "grad(grad)",
        lambda b: b.grad(lambda t: b.grad(energy)(t).sum())(x),
        d2[0],
    )
    c.both("vmap(hessian)", lambda b: b.vmap(b.hessian(energy))(xs), torch.diag_embed(d2))
    c.both("jacfwd(jacrev)", lambda b: b.jacfwd(b.jacrev(energy))(x), torch.diag(d2[0]))
    if c.backend.transforms().get("jvp") != "missing":
        c.both(
            "jacrev(jvp)",
            lambda b: b.jacrev(lambda t: b.jvp(energy, (t,), (v,))[1])(x),
            d2[0] * v,
        )


def _family_errors(c: _Context) -> None:
    torch = c.torch
    x, y = c.randn(3), c.randn(3)
    cases: List[Tuple[str, Tuple[str, ...], Callable[[Backend], Any]]] = [
        ("grad of a non-scalar", (), lambda b: b.grad(torch.sin)(x)),
        ("grad of a non-tensor", (), lambda b: b.grad(lambda t: 1.0)(x)),
        ("grad has_aux without a pair", (), lambda b: b.grad(lambda t: t.sum(), has_aux=True)(x)),
        ("grad argnums out of range", (), lambda b: b.grad(lambda t: t.sum(), 1)(x)),
        ("grad repeated argnums", (), lambda b: b.grad(lambda s, t: (s * t).sum(), (0, 0))(x, y)),
        (
            "grad_and_value empty argnums",
            (),
            lambda b: b.grad_and_value(lambda s, t: (s * t).sum(), ())(x, y),
        ),
        ("jacfwd argnums out of range", (), lambda b: b.jacfwd(torch.sin, 2)(x)),
        ("jacfwd bad randomness", (), lambda b: b.jacfwd(torch.sin, randomness="often")(x)),
        ("hessian argnums not an int", (), lambda b: b.hessian(torch.sin, 0.0)(x)),  # type: ignore[arg-type]
        ("vjp has_aux without a pair", ("vjp",), lambda b: b.vjp(torch.sin, x, has_aux=True)),
        (
            "vjp_fn with a mis-shaped cotangent",
            ("vjp",),
            lambda b: b.vjp(torch.sin, x)[1](c.randn(4)),
        ),
        ("jvp strict=True", ("jvp",), lambda b: b.jvp(torch.sin, (x,), (y,), strict=True)),
        ("jvp primals not a tuple", ("jvp",), lambda b: b.jvp(torch.sin, x, (y,))),
        ("jvp mismatched tangent shape", ("jvp",), lambda b: b.jvp(torch.sin, (x,), (c.randn(4),))),
        (
            "jvp mismatched tangent structure",
            ("jvp",),
            lambda b: b.jvp(torch.add, (x, y), (y,)),
        ),
        ("jvp non-tensor output", ("jvp",), lambda b: b.jvp(lambda t: 1.0, (x,), (y,))),
        (
            "jvp has_aux without a pair",
            ("jvp",),
            lambda b: b.jvp(torch.sin, (x,), (y,), has_aux=True),
        ),
        (
            "linearize jvp_fn with a mis-shaped tangent",
            ("linearize",),
            lambda b: b.linearize(torch.sin, x)[1](c.randn(4)),
        ),
    ]
    ways = c.backend.transforms()
    problems = []
    for what, uses, run in cases:
        if any(ways.get(t) == "missing" for t in uses):
            continue
        try:
            c.raises_like_reference(what, run)
        except AssertionError as exc:
            problems.append(str(exc))
        except _Skip:
            pass
    if problems:
        raise AssertionError("; ".join(problems))


def _dtype(c: _Context) -> None:
    x = c.randn(4).float()
    c.both("float32 jacrev", lambda b: b.jacrev(c.torch.sin)(x), c.torch.diag(x.cos()))
    c.both("float32 vmap", lambda b: b.vmap(c.torch.dot)(x[None], x[None]), (x * x).sum()[None])


#: Every check, in report order: name -> (what it checks, function, capability).
#: A check tied to a capability always runs; when it fails for a backend whose
#: probe says it lacks that capability (and that does not claim it), the
#: result is a skip that gives both reasons, not a failure.
CHECKS: Dict[str, Tuple[str, Callable[[_Context], None], Optional[str]]] = {
    "jacrev_basic": ("Jacobians of elementwise and matrix functions", _jacrev_basic, None),
    "jacrev_has_aux": ("has_aux returns (jacobian, aux) with aux untouched", _jacrev_has_aux, None),
    "jacrev_argnums": ("argnums as int, negative int and tuple", _jacrev_argnums, None),
    "jacrev_pytrees": (
        "dict inputs, dict/tuple outputs, nested result structure",
        _jacrev_pytrees,
        None,
    ),
    "jacrev_chunk_size": ("chunk_size gives the same Jacobian", _jacrev_chunk_size, "chunk_size"),
    "jacrev_inner_no_grad": (WAIVABLE["jacrev_inner_no_grad"], _jacrev_inner_no_grad, None),
    "jacrev_outer_no_grad": (
        "an outer torch.no_grad does not stop jacrev",
        _jacrev_outer_no_grad,
        None,
    ),
    "jacrev_differentiable": (
        "Jacobians stay differentiable exactly when torch.func's do",
        _jacrev_differentiable,
        None,
    ),
    "hessian": ("jacrev(jacrev(f)), without perturbation confusion", _hessian, "higher_order"),
    "vmap_basic": ("vmap and nested vmap of dot", _vmap_basic, None),
    "vmap_in_dims": ("in_dims as int, tuple with None, and dict", _vmap_in_dims, None),
    "vmap_out_dims": ("out_dims as int and tuple; pytree outputs", _vmap_out_dims, None),
    "vmap_kwargs": ("keyword arguments are passed unbatched", _vmap_kwargs, None),
    "vmap_chunk_size": ("chunk_size gives the same result", _vmap_chunk_size, "chunk_size"),
    "vmap_randomness": (
        "randomness 'same', 'different' and 'error'",
        _vmap_randomness,
        "randomness",
    ),
    "vmap_jacrev": ("vmap(jacrev(f)) gives batched Jacobians", _vmap_jacrev, None),
    "errors": ("bad arguments raise torch.func's exception types", _errors, None),
    "grad": ("grad and grad_and_value: argnums, kwargs, has_aux, no_grad", _grad, None),
    "vjp": ("vjp and its vjp_fn, with has_aux", _vjp, None),
    "jvp": ("jvp of tensors and tuples, with has_aux", _jvp, "forward_mode"),
    "jacfwd": ("jacfwd with argnums and has_aux", _jacfwd, "forward_mode"),
    "hessian_transform": (
        "hessian, nested [i][j] for tuple argnums",
        _hessian_transform,
        "hessian",
    ),
    "linearize": ("linearize: one output, repeated products", _linearize, "forward_mode"),
    "family_compositions": (
        "vmap(grad), grad(grad), vmap(hessian), jacfwd(jacrev), jacrev(jvp)",
        _family_compositions,
        "higher_order",
    ),
    "family_errors": (
        "bad arguments to grad, vjp, jvp, jacfwd, hessian, linearize raise torch.func's types",
        _family_errors,
        None,
    ),
    "dtype": ("float32 in, float32 out", _dtype, None),
}


# -- running ------------------------------------------------------------------------


def check_backend(
    backend: Union[Backend, str],
    *,
    reference: Union[Backend, str, None] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Run the conformance kit on ``backend``.

    Parameters
    ----------
    backend : Backend or str
        The backend, or its name.
    reference : Backend, str or None
        What to compare with; by default torch.func, or the loop backend
        where torch.func does not load.
    rtol, atol : float or None
        Tolerances for float64 values; by default the backend's own
        ``tolerance`` if it states one, else :data:`DEFAULT_TOLERANCE`.
    raise_on_failure : bool
        Raise :class:`ConformanceError` (an ``AssertionError``, so a bare call
        in a test fails the test with the summary) when a check fails.

    Returns
    -------
    ConformanceReport
        Every check's result; ``.ok``, ``.summary()``, ``.to_dict()``.

    Raises
    ------
    ConformanceError
        When a check fails and ``raise_on_failure`` is true.
    adbackends.BackendError
        When ``backend`` or ``reference`` is a name that does not load.
    TypeError, ValueError
        For a ``backend`` that is not a Backend, or malformed tolerances,
        claims or limitations.
    """
    from .selection import get

    target = get(backend) if isinstance(backend, str) else backend
    if not isinstance(target, Backend):
        raise TypeError(
            f"check_backend() takes an adbackends.Backend or a backend name, got "
            f"{type(backend).__name__}"
        )
    ref = _reference(reference)
    rtol, atol = _tolerances(target, rtol, atol)
    limitations = _limitations(target)
    context = _Context(target, ref, rtol, atol)

    claims = _declared_claims(target)
    results = []
    for name, (_, check, capability) in CHECKS.items():
        result = _run(name, check, context, limitations.get(name))
        if result.status == "fail" and capability is not None and capability not in claims:
            # Excused only when the probe agrees the capability is missing.
            support = target.supports(capability)
            if not support:
                why = f"lacks capability {capability!r} ({support.reason}); {result.detail}"
                result = result._replace(status="skip", detail=why)
        results.append(result)
    for cap in claims:
        results.append(_run_claim(target, cap))
    capabilities = {cap: (s.ok, s.reason) for cap, s in target.capabilities().items()}
    report = ConformanceReport(target.name, ref.name, rtol, atol, results, capabilities)
    if raise_on_failure and not report.ok:
        raise ConformanceError(report)
    return report


def _reference(reference: Union[Backend, str, None]) -> Backend:
    from .registry import REGISTRY

    if isinstance(reference, Backend):
        return reference
    if isinstance(reference, str):
        from .selection import get

        return get(reference)
    if reference is not None:
        raise TypeError(f"reference must be a Backend, a name or None, got {reference!r}")
    if REGISTRY.failure("torch.func") is None:
        return REGISTRY.get("torch.func")
    return REGISTRY.get("loop")


def _tolerances(
    backend: Backend, rtol: Optional[float], atol: Optional[float]
) -> Tuple[float, float]:
    stated = getattr(backend, "tolerance", None)
    if stated is None:
        default = DEFAULT_TOLERANCE
    else:
        if not (isinstance(stated, tuple) and len(stated) == 2):
            raise ValueError(
                f"Backend.tolerance must be a pair (rtol, atol) of non-negative floats, "
                f"got {stated!r}"
            )
        default = (float(stated[0]), float(stated[1]))
    out = (default[0] if rtol is None else float(rtol), default[1] if atol is None else float(atol))
    if not all(math.isfinite(t) and t >= 0 for t in out):
        raise ValueError(f"tolerances must be finite and non-negative, got rtol, atol = {out}")
    return out


def _limitations(backend: Backend) -> Dict[str, str]:
    declared = getattr(backend, "limitations", None) or {}
    if not isinstance(declared, dict):
        raise ValueError(f"Backend.limitations must be a dict {{check: reason}}, got {declared!r}")
    bad = [name for name in declared if name not in WAIVABLE]
    if bad:
        raise ValueError(
            f"Backend.limitations names {bad!r}, which cannot be waived; only "
            f"{sorted(WAIVABLE)} can"
        )
    return {str(k): str(v) for k, v in declared.items()}


def _declared_claims(backend: Backend) -> Tuple[str, ...]:
    from .probes import PROBES

    return check_capability_names(getattr(backend, "claims", ()), PROBES)


def _run(
    name: str, check: Callable[[_Context], None], context: _Context, waiver: Optional[str]
) -> CheckResult:
    import warnings

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            check(context)
    except _Skip as exc:
        return CheckResult(name, "skip", str(exc), time.perf_counter() - start)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, AssertionError) else summarize_exception(exc)
        elapsed = time.perf_counter() - start
        if waiver is not None:
            return CheckResult(name, "waived", f"{waiver} (it fails: {detail})", elapsed)
        return CheckResult(name, "fail", detail, elapsed)
    elapsed = time.perf_counter() - start
    if waiver is not None:
        return CheckResult(name, "pass", f"declared a limitation, but passes: {waiver}", elapsed)
    return CheckResult(name, "pass", "", elapsed)


def _run_claim(backend: Backend, capability: str) -> CheckResult:
    start = time.perf_counter()
    support = backend.supports(capability)
    elapsed = time.perf_counter() - start
    name = f"claim:{capability}"
    if support:
        return CheckResult(name, "pass", "", elapsed)
    return CheckResult(name, "fail", f"claimed, but the probe fails: {support.reason}", elapsed)
