"""The survey of functorch through adbackends: cases, and how one is judged.

Each case is a call of the transform family, written once and run on two
backends: adbackends' functorch backend and the loop backend (which calls
nothing but ``torch.autograd.grad`` and is checked against torch.func by its
own differential tests). :func:`judge` says what one case shows:

``"same"``
    both return, and the results agree in pytree structure, shape, dtype,
    ``requires_grad`` and value;
``"both raise"``
    both raise the same exception type;
``"refused"``
    functorch raises and its backend's ``cannot_transform`` recognises the
    error, so a chain ``functorch>loop`` runs the call on the loop instead
    (which then returns or raises as the loop does);
``"silent"``
    functorch returns a result that differs from the loop's: a silent wrong
    result, what the guards in :mod:`adbackends.backends._functorch_guards`
    exist to make unreachable;
``"error"``
    any other disagreement (functorch raises an error it does not recognise
    where the loop computes, functorch returns where the loop raises, or the
    two raise different exception types).

``python -m tests.functorch_survey`` runs every case and prints the verdicts.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

Pair = collections.namedtuple("Pair", "first second")


class Verdict(NamedTuple):
    kind: str
    detail: str


def _outcome(call: Callable[[], Any]) -> Tuple[bool, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, call()
    except Exception as exc:  # judged below
        return False, exc


def difference(
    actual: Any,
    expected: Any,
    atol: float = 1e-7,
    rtol: float = 1e-6,
    requires_grad: bool = True,
) -> Optional[str]:
    """How two results differ (structure, shape, dtype, requires_grad, value), or None."""
    a_leaves, a_spec = tree_flatten(actual)
    e_leaves, e_spec = tree_flatten(expected)
    if a_spec != e_spec:
        return f"pytree structure {a_spec} != {e_spec}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                return f"leaf {i}: {type(a).__name__} is not a tensor"
            if a.shape != e.shape:
                return f"leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            if a.dtype != e.dtype:
                return f"leaf {i}: dtype {a.dtype} != {e.dtype}"
            if requires_grad and a.requires_grad != e.requires_grad:
                return f"leaf {i}: requires_grad {a.requires_grad} != {e.requires_grad}"
            if a.numel() and not torch.allclose(
                a.detach(), e.detach(), atol=atol, rtol=rtol, equal_nan=True
            ):
                diff = (a.detach() - e.detach()).abs().max().item()
                return f"leaf {i}: values differ (max abs difference {diff:.3g})"
        elif type(a) is not type(e) or a != e:
            return f"leaf {i}: {a!r} != {e!r}"
    return None


def judge(call: Callable[[Any], Any], functorch: Any, loop: Any, **tol: Any) -> Verdict:
    """Run ``call(backend)`` on both backends and classify the outcome (see the module)."""
    ok_loop, expected = _outcome(lambda: call(loop))
    ok_ft, actual = _outcome(lambda: call(functorch))
    if ok_ft and ok_loop:
        why = difference(actual, expected, **tol)
        return Verdict("same", "") if why is None else Verdict("silent", why)
    if not ok_ft and functorch.cannot_transform(actual) is not None:
        # Through a chain the loop decides, whatever it gives.
        return Verdict("refused", f"{type(actual).__name__}: {actual}")
    if ok_loop:
        return Verdict("error", f"functorch raised {type(actual).__name__}: {actual}")
    if ok_ft:
        return Verdict("error", f"functorch returned where the loop raised {expected!r}")
    if type(actual) is not type(expected):
        return Verdict(
            "error",
            f"functorch raised {type(actual).__name__}: {actual}; "
            f"the loop raised {type(expected).__name__}: {expected}",
        )
    return Verdict("both raise", type(actual).__name__)


# -- inputs ----------------------------------------------------------------------------


def _t(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64, rg: bool = False) -> Any:
    g = torch.Generator().manual_seed(seed)
    out = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return out.to(dtype).requires_grad_(rg)


def _scalar(x: Any, y: Any) -> Any:
    return (x.sin() * y).sum() + (x * x).sum() * y.cos().sum()


def _vector(x: Any, y: Any) -> Any:
    return x.sin() * y + x.cos().sum()


def _with_aux(x: Any, y: Any) -> Any:
    return _scalar(x, y), {"aux": x * 2, "pair": Pair(y.exp(), x.sum())}


def _vector_aux(x: Any, y: Any) -> Any:
    return _vector(x, y), (x.tanh(), [y * 3])


_W = _t(3, seed=9, rg=True)


def _closure(x: Any) -> Any:
    return (_W * x.sin()).sum()


def _closure_vec(x: Any) -> Any:
    return _W * x.sin()


def _inner_no_grad(x: Any) -> Any:
    with torch.no_grad():
        c = (x * x).sum()
    return (x.sin() * c).sum()


def _inner_enable_grad(x: Any) -> Any:
    with torch.enable_grad():
        return (x.exp() * x).sum()


def _complex_loss(z: Any) -> Any:
    return (z * z.conj()).real.sum() + (z.sin().abs() ** 2).sum()


def _complex_map(z: Any) -> Any:
    return z * z + z.conj()


X = _t(3)
Y = _t(3, seed=1)
XB = _t(4, 3, seed=2)
YB = _t(4, 3, seed=3)


def _vjp_call(b: Any) -> Any:
    out, fn = b.vjp(_vector, X, Y)
    return out, fn(torch.ones(3, dtype=torch.float64))


def _vjp_aux(b: Any) -> Any:
    out, fn, aux = b.vjp(_vector_aux, X, Y, has_aux=True)
    return out, fn(Y), aux


def _vmap_vjp_fn(b: Any) -> Any:
    _, fn = b.vjp(_vector, X, Y)
    return b.vmap(fn)(torch.eye(3, dtype=torch.float64))


def _linearize(b: Any) -> Any:
    out, fn = b.linearize(_vector, X, Y)
    return out, fn(Y, X)


def _randomness(mode: str) -> Callable[[Any], Any]:
    def call(b: Any) -> Any:
        torch.manual_seed(0)
        out = b.vmap(lambda v: v + torch.rand(3, dtype=torch.float64), randomness=mode)(XB)
        noise = out - XB
        same = bool(torch.allclose(noise, noise[:1].expand_as(noise)))
        # Draws differ between backends; what must agree is the shape and
        # whether the samples share them.
        return out.shape, same

    return call


def _under(mode: Callable[[], Any], call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(b: Any) -> Any:
        with mode():
            return call(b)

    return run


#: name -> call(backend). Each transform of the family over the arguments and
#: settings old functorch copies handle differently.
CASES: Dict[str, Callable[[Any], Any]] = {}


def _add(name: str, call: Callable[[Any], Any]) -> None:
    assert name not in CASES, name
    CASES[name] = call


for _nums in (0, 1, -1, -2, (0, 1), (-1, 0), (1,), (-2,), (0, -1)):
    _add(f"jacrev argnums={_nums}", lambda b, n=_nums: b.jacrev(_vector, n)(X, Y))
    _add(f"jacfwd argnums={_nums}", lambda b, n=_nums: b.jacfwd(_vector, n)(X, Y))
    _add(f"grad argnums={_nums}", lambda b, n=_nums: b.grad(_scalar, n)(X, Y))
    _add(f"grad_and_value argnums={_nums}", lambda b, n=_nums: b.grad_and_value(_scalar, n)(X, Y))
    _add(f"hessian argnums={_nums}", lambda b, n=_nums: b.hessian(_scalar, n)(X, Y))
    _add(
        f"jacrev chunk_size=2 argnums={_nums}",
        lambda b, n=_nums: b.jacrev(_vector, n, chunk_size=2)(X, Y),
    )
    _add(
        f"vmap(jacrev) argnums={_nums}",
        lambda b, n=_nums: b.vmap(b.jacrev(_vector, n))(XB, YB),
    )
for _nums in (-1, (0, -1)):
    _add(
        f"jacrev has_aux argnums={_nums}",
        lambda b, n=_nums: b.jacrev(_vector_aux, n, has_aux=True)(X, Y),
    )
    _add(
        f"jacfwd has_aux argnums={_nums}",
        lambda b, n=_nums: b.jacfwd(_vector_aux, n, has_aux=True)(X, Y),
    )
    _add(
        f"grad has_aux argnums={_nums}", lambda b, n=_nums: b.grad(_with_aux, n, has_aux=True)(X, Y)
    )
    _add(
        f"grad_and_value has_aux argnums={_nums}",
        lambda b, n=_nums: b.grad_and_value(_with_aux, n, has_aux=True)(X, Y),
    )
for _nums in (3, -3, (0, 0), ()):
    _add(f"jacrev bad argnums={_nums}", lambda b, n=_nums: b.jacrev(_vector, n)(X, Y))
    _add(f"grad bad argnums={_nums}", lambda b, n=_nums: b.grad(_scalar, n)(X, Y))
    _add(f"jacfwd bad argnums={_nums}", lambda b, n=_nums: b.jacfwd(_vector, n)(X, Y))
    _add(f"hessian bad argnums={_nums}", lambda b, n=_nums: b.hessian(_scalar, n)(X, Y))

# vmap: in_dims / out_dims
_add("vmap in_dims=(0, None)", lambda b: b.vmap(_vector, (0, None))(XB, Y))
_add("vmap in_dims=(None, 0)", lambda b: b.vmap(_vector, (None, 0))(X, YB))
_add("vmap in_dims=-1", lambda b: b.vmap(_vector, -1)(XB.T, YB.T))
_add("vmap in_dims=(-1, 0)", lambda b: b.vmap(_vector, (-1, 0))(XB.T.contiguous(), YB))
_add("vmap in_dims=(None, None)", lambda b: b.vmap(_vector, (None, None))(X, Y))
_add("vmap in_dims=None", lambda b: b.vmap(_vector, None)(X, Y))
_add(
    "vmap nested in_dims (dict, None)",
    lambda b: b.vmap(lambda d, y: d["p"] * d["q"] + y, ({"p": 0, "q": None}, None))(
        {"p": XB, "q": X}, Y
    ),
)
_add(
    "vmap nested in_dims tuple",
    lambda b: b.vmap(lambda t: t[0] * t[1][0], ((0, (1,)),))((XB, (YB.T,))),
)
_add("vmap out_dims=1", lambda b: b.vmap(_vector, out_dims=1)(XB, YB))
_add("vmap out_dims=-1", lambda b: b.vmap(_vector, out_dims=-1)(XB, YB))
_add(
    "vmap out_dims=(0, -1)",
    lambda b: b.vmap(lambda x, y: (x * y, x + y), out_dims=(0, -1))(XB, YB),
)
_add(
    "vmap out_dims=None unbatched output",
    lambda b: b.vmap(lambda x: (x * 2, Y * 3), out_dims=(0, None))(XB),
)
_add("vmap out_dims=None", lambda b: b.vmap(lambda x: Y * 3, out_dims=None)(XB))
_add("vmap unbatched output", lambda b: b.vmap(lambda x: Y * 3)(XB))
_add("vmap unbatched output out_dims=1", lambda b: b.vmap(lambda x: Y * 3, out_dims=1)(XB))
_add(
    "vmap unbatched 0-dim output out_dims=-1",
    lambda b: b.vmap(lambda x: Y.sum() * 3, out_dims=-1)(XB),
)
_add(
    "vmap one unbatched output of two out_dims=-1",
    lambda b: b.vmap(lambda x, y: (x * y, Y.sum() + y.sum() * 0), (0, None), -1)(XB, Y),
)
_add(
    "vmap pytree output",
    lambda b: b.vmap(lambda x, y: {"a": x * y, "b": [x.sum(), Pair(y, x)]})(XB, YB),
)
_add("vmap kwargs unbatched", lambda b: b.vmap(lambda x, s=1.0: x * s)(XB, s=Y))
_add("vmap chunk_size=3", lambda b: b.vmap(_vector, chunk_size=3)(XB, YB))
_add("vmap chunk_size=1 in_dims None", lambda b: b.vmap(_vector, (0, None), chunk_size=1)(XB, Y))
_add("vmap(vmap)", lambda b: b.vmap(b.vmap(_vector))(XB[None].expand(2, 4, 3), YB[None] * 2))
_add("vmap bad in_dims", lambda b: b.vmap(_vector, (0, 2))(XB, YB))
_add("vmap mismatched batch", lambda b: b.vmap(_vector)(XB, YB[:3]))
_add("vmap bad out_dims", lambda b: b.vmap(_vector, out_dims=(0, 1))(XB, YB))
_add("vmap randomness=same", _randomness("same"))
_add("vmap randomness=different", _randomness("different"))
_add("vmap randomness=error", _randomness("error"))

# vjp / jvp / linearize
_add("vjp", _vjp_call)
_add("vjp has_aux", _vjp_aux)
_add("vmap(vjp_fn)", _vmap_vjp_fn)
_add(
    "vjp pytree",
    lambda b: b.vjp(lambda d: {"s": d["a"] * d["b"]}, {"a": X, "b": Y})[1]({"s": X}),
)
_add("jvp", lambda b: b.jvp(_vector, (X, Y), (Y, X)))
_add("jvp has_aux", lambda b: b.jvp(_vector_aux, (X, Y), (Y, X), has_aux=True))
_add("jvp integer tangent", lambda b: b.jvp(torch.sin, (X,), (torch.ones(3, dtype=torch.long),)))
_add(
    "jvp integer primal",
    lambda b: b.jvp(lambda n: n * 2, (torch.ones(3, dtype=torch.long),), (X,)),
)
_add("jvp tangent shape mismatch", lambda b: b.jvp(torch.sin, (X,), (XB,)))
_add("linearize", _linearize)

# nesting
_add("jacrev(jacrev)", lambda b: b.jacrev(b.jacrev(_vector))(X, Y))
_add("jacrev(jacrev) argnums=-1", lambda b: b.jacrev(b.jacrev(_vector, -1), -1)(X, Y))
_add("jacfwd(jacrev)", lambda b: b.jacfwd(b.jacrev(_scalar))(X, Y))
_add("grad(grad)", lambda b: b.grad(lambda x: b.grad(_scalar)(x, Y).sum())(X))
_add("vmap(grad)", lambda b: b.vmap(b.grad(_scalar))(XB, YB))
_add("vmap(grad) argnums=-1", lambda b: b.vmap(b.grad(_scalar, -1))(XB, YB))
_add("vmap(hessian)", lambda b: b.vmap(b.hessian(_scalar))(XB, YB))
_add("vmap(hessian) argnums=-1", lambda b: b.vmap(b.hessian(_scalar, -1))(XB, YB))
_add("vmap(jacfwd)", lambda b: b.vmap(b.jacfwd(_vector))(XB, YB))
_add("jacrev(vmap)", lambda b: b.jacrev(b.vmap(_vector))(XB, YB))
_add(
    "vmap(jacrev) chunk_size",
    lambda b: b.vmap(b.jacrev(_vector, chunk_size=1), chunk_size=2)(XB, YB),
)

# closures over tensors that require grad, inputs that require grad
_add("jacrev closure", lambda b: b.jacrev(_closure_vec)(X))
_add("grad closure", lambda b: b.grad(_closure)(X))
_add("vmap closure", lambda b: b.vmap(_closure_vec)(XB))
_add("hessian closure", lambda b: b.hessian(_closure)(X))
_add("vmap(grad) closure", lambda b: b.vmap(b.grad(_closure))(XB))
_add("jvp closure", lambda b: b.jvp(_closure_vec, (X,), (Y,)))
_add("vjp closure", lambda b: b.vjp(_closure_vec, X)[1](Y))
_add("jacrev input requires grad", lambda b: b.jacrev(_vector)(_t(3, rg=True), Y))
_add("grad input requires grad", lambda b: b.grad(_scalar)(_t(3, rg=True), Y))
_add("vmap input requires grad", lambda b: b.vmap(_vector)(_t(4, 3, rg=True), YB))
_add("jacfwd input requires grad", lambda b: b.jacfwd(_vector)(_t(3, rg=True), Y))
_add("hessian input requires grad", lambda b: b.hessian(_scalar)(_t(3, rg=True), Y))
_add("vjp input requires grad", lambda b: b.vjp(_vector, _t(3, rg=True), Y)[1](X))
_add("jvp input requires grad", lambda b: b.jvp(_vector, (_t(3, rg=True), Y), (Y, X)))
_add(
    "jacrev input requires grad, outer no_grad",
    _under(torch.no_grad, lambda b: b.jacrev(_vector)(_t(3, rg=True), Y)),
)

# grad mode around and inside
for _mode_name, _mode in (("no_grad", torch.no_grad), ("enable_grad", torch.enable_grad)):
    _add(f"{_mode_name} around grad", _under(_mode, lambda b: b.grad(_scalar)(X, Y)))
    _add(f"{_mode_name} around jacrev", _under(_mode, lambda b: b.jacrev(_vector)(X, Y)))
    _add(f"{_mode_name} around jacfwd", _under(_mode, lambda b: b.jacfwd(_vector)(X, Y)))
    _add(f"{_mode_name} around hessian", _under(_mode, lambda b: b.hessian(_scalar)(X, Y)))
    _add(f"{_mode_name} around vjp", _under(_mode, _vjp_call))
    _add(f"{_mode_name} around jvp", _under(_mode, lambda b: b.jvp(_vector, (X, Y), (Y, X))))
    _add(
        f"{_mode_name} around vmap(grad)", _under(_mode, lambda b: b.vmap(b.grad(_scalar))(XB, YB))
    )
    _add(f"{_mode_name} around grad closure", _under(_mode, lambda b: b.grad(_closure)(X)))
    _add(f"{_mode_name} around vmap closure", _under(_mode, lambda b: b.vmap(_closure_vec)(XB)))
_add("no_grad inside grad", lambda b: b.grad(_inner_no_grad)(X))
_add("no_grad inside jacrev", lambda b: b.jacrev(_inner_no_grad)(X))
_add("no_grad inside hessian", lambda b: b.hessian(_inner_no_grad)(X))
_add("no_grad inside vmap(grad)", lambda b: b.vmap(b.grad(_inner_no_grad))(XB))
_add(
    "enable_grad inside grad under no_grad",
    _under(torch.no_grad, lambda b: b.grad(_inner_enable_grad)(X)),
)
_add("no_grad inside jacfwd", lambda b: b.jacfwd(_inner_no_grad)(X))

# integer and complex inputs
_I = torch.arange(12).reshape(4, 3)
_add("vmap integer input", lambda b: b.vmap(lambda n: n * 2 + 1)(_I))
_add("vmap integer and float", lambda b: b.vmap(lambda n, x: n * x)(_I, XB))
_add("jacrev integer input", lambda b: b.jacrev(lambda n: n * 2.0)(_I[0]))
_add("grad integer input", lambda b: b.grad(lambda n: (n * 2.0).sum())(_I[0]))
_add("jacfwd integer input", lambda b: b.jacfwd(lambda n: n * 2.0)(_I[0]))
_add("hessian integer input", lambda b: b.hessian(lambda n: (n * 2.0).sum())(_I[0]))
_add("vjp integer input", lambda b: b.vjp(lambda n: n * 2.0, _I[0])[1](X))
_add("grad integer output", lambda b: b.grad(lambda x: (x > 0).sum())(X))
_add(
    "jacrev integer argument not differentiated",
    lambda b: b.jacrev(lambda x, n: x * n, 0)(X, _I[0]),
)
_Z = torch.complex(_t(3, seed=4), _t(3, seed=5))
_ZB = torch.complex(_t(4, 3, seed=6), _t(4, 3, seed=7))
_add("grad complex input", lambda b: b.grad(_complex_loss)(_Z))
_add("vmap(grad) complex input", lambda b: b.vmap(b.grad(_complex_loss))(_ZB))
_add("jacrev complex", lambda b: b.jacrev(_complex_map)(_Z))
_add("jacfwd complex", lambda b: b.jacfwd(_complex_map)(_Z))
_add("vjp complex", lambda b: b.vjp(_complex_map, _Z)[1](_Z.conj()))
_add("jvp complex", lambda b: b.jvp(_complex_map, (_Z,), (_Z,)))
_add("vmap complex", lambda b: b.vmap(_complex_map)(_ZB))
_add("grad complex output", lambda b: b.grad(lambda z: (z * z).sum())(_Z))
_add("hessian complex input", lambda b: b.hessian(_complex_loss)(_Z))
_add("grad real to complex closure", lambda b: b.grad(lambda x: (x * _Z).abs().sum())(X))
_add("jacrev float32", lambda b: b.jacrev(_vector)(X.float(), Y.float()))
_add(
    "jacfwd requires_grad of a linear in-place chain",
    lambda b: b.jacfwd(lambda x: (x * 1.0).mul_(0.5))(_t(3, rg=True)),
)
_add(
    "hessian requires_grad of a zero block",
    lambda b: b.hessian(lambda x, y: x.cos().sum(), (0, 1))(_t(3, rg=True), Y),
)
_add("jacfwd float32", lambda b: b.jacfwd(_vector)(X.float(), Y.float()))
_add("jacfwd float32 0-dim times a number", lambda b: b.jacfwd(lambda x: x * 1.0)(X[0].float()))

# zero-size batches and empty inputs
_E = torch.ones(0, 3, dtype=torch.float64)
_add("vmap zero batch", lambda b: b.vmap(_vector)(_E, _E))
_add("vmap zero batch in_dims None", lambda b: b.vmap(_vector, (0, None))(_E, Y))
_add("vmap zero batch out_dims=1", lambda b: b.vmap(_vector, out_dims=1)(_E, _E))
_add(
    "vmap zero batch of an input that requires grad",
    lambda b: b.vmap(lambda v: v)(torch.ones(0, dtype=torch.float64, requires_grad=True)),
)
_add(
    "vmap identity under no_grad",
    _under(torch.no_grad, lambda b: b.vmap(lambda v: v)(_t(2, 3, rg=True))),
)
_add(
    "vmap(jacrev) of an output without the input under no_grad",
    _under(
        torch.no_grad,
        lambda b: b.vmap(b.jacrev(lambda x, y: y, 0), (None, 0))(_t(rg=True), _t(1, rg=True)),
    ),
)
_add("vmap zero batch chunk_size", lambda b: b.vmap(_vector, chunk_size=2)(_E, _E))
_add("vmap(jacrev) zero batch", lambda b: b.vmap(b.jacrev(_vector))(_E, _E))
_add("vmap(grad) zero batch", lambda b: b.vmap(b.grad(_scalar))(_E, _E))
_add("vmap(hessian) zero batch", lambda b: b.vmap(b.hessian(_scalar))(_E, _E))
_add("vmap(vjp_fn) zero batch", lambda b: b.vmap(b.vjp(_vector, X, Y)[1])(_E))
_add("jacrev empty input", lambda b: b.jacrev(lambda x: x * 2)(torch.ones(0, dtype=torch.float64)))
_add("jacrev empty output", lambda b: b.jacrev(lambda x: x[:0])(X))
_add("grad 0-dim", lambda b: b.grad(lambda x: x.sin())(X[0]))
_add("vmap 0-dim samples", lambda b: b.vmap(lambda x: x.sin() * 2)(X))
_add("jacrev 0-dim", lambda b: b.jacrev(lambda x: x.sin())(X[0]))
_add("vmap(jacrev) 0-dim samples", lambda b: b.vmap(b.jacrev(lambda x: x.sin()))(X))
_add("hessian 0-dim", lambda b: b.hessian(lambda x: x.sin())(X[0]))


# outputs that do not depend on an input, unused arguments, views, in-place
_add("grad unused argument", lambda b: b.grad(lambda x, y: (x * 2).sum(), 1)(X, Y))
_add("jacrev unused argument", lambda b: b.jacrev(lambda x, y: x * 2, (0, 1))(X, Y))
_add("jacfwd unused argument", lambda b: b.jacfwd(lambda x, y: x * 2, (0, 1))(X, Y))
_add("hessian linear function", lambda b: b.hessian(lambda x: (x * 2).sum())(X))
_add("vjp output independent of input", lambda b: b.vjp(lambda x: Y * 2, X)[1](X))
_add("jvp output independent of input", lambda b: b.jvp(lambda x: Y * 2, (X,), (X,)))
_add("jacrev of a view", lambda b: b.jacrev(lambda x: x.view(3, 1).t()[0])(X))
_add("jacrev in-place on a copy", lambda b: b.jacrev(lambda x: x.clone().mul_(2).add_(x))(X))
_add("vmap in-place on a copy", lambda b: b.vmap(lambda x: x.clone().mul_(2).add_(x))(XB))
_add("vmap in-place on unbatched", lambda b: b.vmap(lambda x: Y.clone().add_(x))(XB))
_add("grad detach inside", lambda b: b.grad(lambda x: (x.detach() * x).sum())(X))
_add("vmap(grad) detach inside", lambda b: b.vmap(b.grad(lambda x: (x.detach() * x).sum()))(XB))
_add("jacfwd detach inside", lambda b: b.jacfwd(lambda x: x.detach() * x)(X))
_add("vmap python number output", lambda b: b.vmap(lambda x: (x * 2, 3.0))(XB))
_add("grad non-scalar output", lambda b: b.grad(lambda x: x * 2)(X))
_add(
    "vmap matmul batched weight",
    lambda b: b.vmap(torch.mv, (0, None))(XB.reshape(4, 3, 1).expand(4, 3, 3), Y),
)
_add("jacrev has_aux non-tensor aux", lambda b: b.jacrev(lambda x: (x * 2, 7), has_aux=True)(X))
_add(
    "grad has_aux non-tensor aux", lambda b: b.grad(lambda x: ((x * 2).sum(), "a"), has_aux=True)(X)
)


def run_all(functorch: Any, loop: Any) -> List[Tuple[str, Verdict]]:
    return [(name, judge(call, functorch, loop)) for name, call in CASES.items()]


def _main() -> None:
    from adbackends.registry import REGISTRY

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functorch = REGISTRY.get("functorch")
    loop = REGISTRY.get("loop")
    counts: Dict[str, int] = collections.Counter()
    for name, verdict in run_all(functorch, loop):
        counts[verdict.kind] += 1
        if verdict.kind not in ("same", "both raise"):
            print(f"{verdict.kind:8} {name}: {verdict.detail[:300]}")
    print(f"torch {torch.__version__}, functorch {functorch.version}:", dict(counts))


if __name__ == "__main__":
    _main()
