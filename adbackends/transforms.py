"""The public transforms: torch.func's family, plus ``fjacrev`` and ``fvmap``.

``jacrev``, ``vmap``, ``grad``, ``grad_and_value``, ``vjp``, ``jvp``,
``jacfwd``, ``hessian`` and ``linearize`` are thin functions with
torch.func's exact signatures that hand over to the active backend (see
:func:`adbackends.current`). The backend is looked up when the transform is
created, so ``adbackends.jacrev(f)`` built inside ``with
adbackends.using("loop"):`` keeps using the loop backend when it is called
later. ``vjp``, ``jvp`` and ``linearize`` compute at once, on the backend
active at the call.

The one setting here is :data:`hessian_strategy`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

from . import _memory
from .backends import _hessian
from .selection import _choose

__all__ = [
    "fjacrev",
    "fvmap",
    "grad",
    "grad_and_value",
    "hessian",
    "hessian_strategy",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "vjp",
    "vmap",
]

#: How the native backends (torch.func, functorch) compute :func:`hessian`:
#: ``"reverse"`` (``jacrev(jacrev(f))``, the default: faster on CPU at every
#: size measured, and it needs no forward-mode rules) or ``"forward"``
#: (``torch.func.hessian``, ``jacfwd(jacrev(f))``). ``None`` defers to the
#: environment variable ``TAD_AD_HESSIAN``, then to ``"reverse"``. Read by
#: :func:`hessian` when a Hessian is built, and handed to the backend (a
#: backend's own ``hessian`` method, called directly, follows
#: ``TAD_AD_HESSIAN``); results are the same either way. The loop backend is
#: always reverse over reverse.
hessian_strategy: Optional[str] = None


def jacrev(
    func: Callable[..., Any],
    argnums: Union[int, Tuple[int, ...]] = 0,
    *,
    has_aux: bool = False,
    chunk_size: Union[int, str, None] = None,
    _preallocate_and_copy: bool = False,
) -> Callable[..., Any]:
    """Jacobian of ``func`` by reverse-mode autodiff, on the active backend.

    Parameters
    ----------
    func : callable
        Takes one or more arguments, at least one a tensor, and returns one or
        more tensors (any pytree of them).
    argnums : int or tuple of int
        The positional argument(s) to differentiate with respect to. A tuple
        gives a tuple of Jacobians. Default 0.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is returned beside the
        Jacobian and not differentiated.
    chunk_size : int, "auto" or None
        How many Jacobian rows to compute at a time; ``None`` is all at once,
        ``1`` is row by row. Lower it to bound memory. ``"auto"`` chooses it
        from a measurement so that the call stays under the memory limit
        (:func:`adbackends.set_max_memory`), all at once when none is set; a
        limit in force when the transform is built makes ``None`` mean
        ``"auto"`` too. See :doc:`memory`.

    Returns
    -------
    callable
        Takes the same arguments as ``func`` and returns the Jacobian (shape
        ``output.shape + input.shape`` per pair), or ``(jacobian, aux)``.

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0, 2.0])
    >>> jac = adbackends.jacrev(torch.sin)(x)
    >>> torch.allclose(jac, torch.diag(torch.cos(x)))
    True

    Composed with itself it gives Hessians:

    >>> hess = adbackends.jacrev(adbackends.jacrev(lambda t: t.sin().sum()))(x)
    >>> torch.allclose(hess, torch.diag(-x.sin()))
    True

    A tuple of ``argnums`` gives one Jacobian per argument:

    >>> dx, dy = adbackends.jacrev(lambda a, b: a + b**2, argnums=(0, 1))(x, x)
    >>> torch.allclose(dy, torch.diag(2 * x))
    True
    """
    if chunk_size == "auto" or (
        chunk_size is None and _memory.limited() and _memory.max_memory() is not None
    ):
        return _memory.auto_backend(_choose().backend).jacrev(  # type: ignore[no-any-return]
            func, argnums, has_aux=has_aux, chunk_size="auto"
        )
    return _choose().backend.jacrev(
        func,
        argnums,
        has_aux=has_aux,
        chunk_size=chunk_size,  # type: ignore[arg-type]
        _preallocate_and_copy=_preallocate_and_copy,
    )


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: Union[int, str, None] = None,
) -> Callable[..., Any]:
    """Map ``func`` over a batch dimension of its inputs, on the active backend.

    Parameters
    ----------
    func : callable
        Takes one or more arguments and returns one or more tensors.
    in_dims : int, None, or a pytree prefix of the arguments
        The dimension of each input to map over; ``None`` leaves an input
        unbatched. Default 0.
    out_dims : int or a pytree prefix of the outputs
        Where the mapped dimension goes in each output. Default 0.
    randomness : {"error", "different", "same"}
        Whether random operations in ``func`` raise, draw independently per
        sample, or draw once for the whole batch.
    chunk_size : int, "auto" or None
        How many samples to process at a time. Lower it to bound memory;
        ``"auto"`` chooses it within the memory limit, as for :func:`jacrev`.

    Returns
    -------
    callable
        Takes batched arguments and returns batched outputs. Keyword arguments
        are passed to ``func`` unbatched.

    Examples
    --------
    >>> import torch, adbackends
    >>> x, y = torch.ones(3, 5), torch.arange(5.0)
    >>> adbackends.vmap(torch.dot, in_dims=(0, None))(x, y)
    tensor([10., 10., 10.])
    >>> adbackends.vmap(lambda t: t**2, out_dims=1)(torch.ones(2, 4)).shape
    torch.Size([4, 2])
    """
    if chunk_size == "auto" or (
        chunk_size is None and _memory.limited() and _memory.max_memory() is not None
    ):
        return _memory.auto_backend(_choose().backend).vmap(  # type: ignore[no-any-return]
            func, in_dims, out_dims, randomness, chunk_size="auto"
        )
    return _choose().backend.vmap(
        func,
        in_dims,
        out_dims,
        randomness,
        chunk_size=chunk_size,  # type: ignore[arg-type]
    )


def fjacrev(
    func: Callable[..., Any],
    argnums: Union[int, Tuple[int, ...]] = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    _preallocate_and_copy: bool = False,
) -> Callable[..., Any]:
    """functorch-style ``jacrev``: always native composable transforms.

    The active backend's own ``jacrev`` when it has native transforms
    (torch.func, functorch), otherwise that of the best backend here that
    does. So after ``use("loop")`` on torch 2, :func:`jacrev` loops while
    ``fjacrev`` is still torch.func's. Same parameters as :func:`jacrev`.

    Raises
    ------
    adbackends.BackendUnavailableError
        When no backend here has native transforms; it names what to install.

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0])
    >>> with adbackends.using("loop"):
    ...     jac = adbackends.fjacrev(torch.sin)(x)
    >>> torch.allclose(jac, torch.diag(x.cos()))
    True
    """
    return _choose().backend.fjacrev(
        func,
        argnums,
        has_aux=has_aux,
        chunk_size=chunk_size,
        _preallocate_and_copy=_preallocate_and_copy,
    )


def fvmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """functorch-style ``vmap``, resolved like :func:`fjacrev`.

    Same parameters as :func:`vmap`.

    Examples
    --------
    >>> import torch, adbackends
    >>> adbackends.fvmap(torch.dot)(torch.ones(2, 3), torch.ones(2, 3))
    tensor([3., 3.])
    """
    return _choose().backend.fvmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)


def grad(
    func: Callable[..., Any], argnums: Union[int, Tuple[int, ...]] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Gradient of a scalar-valued ``func``, on the active backend.

    Parameters
    ----------
    func : callable
        Returns a 0-dim tensor, or ``(tensor, aux)`` with ``has_aux``.
    argnums : int or tuple of int
        The positional argument(s) to differentiate with respect to; a tuple
        gives a tuple of gradients. Default 0.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is returned beside the
        gradient and not differentiated.

    Returns
    -------
    callable
        Takes ``func``'s arguments (keyword arguments are passed through and
        not differentiated) and returns the gradient, shaped like the
        argument, or ``(gradient, aux)``.

    Raises
    ------
    RuntimeError
        When ``func`` returns something other than a scalar tensor, or not a
        pair with ``has_aux``, or for a bad ``argnums`` (torch.func's types).

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0, 2.0])
    >>> adbackends.grad(lambda t: (t**2).sum())(x)
    tensor([0., 2., 4.])

    Composed, it gives higher derivatives:

    >>> adbackends.grad(adbackends.grad(torch.sin))(torch.tensor(0.0))
    tensor(-0.)
    """
    return _choose().backend.grad(func, argnums, has_aux)


def grad_and_value(
    func: Callable[..., Any], argnums: Union[int, Tuple[int, ...]] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Gradient and value of a scalar-valued ``func``, on the active backend.

    Same parameters as :func:`grad`.

    Returns
    -------
    callable
        Returns ``(gradient, value)``, or ``(gradient, (value, aux))`` with
        ``has_aux``.

    Examples
    --------
    >>> import torch, adbackends
    >>> g, value = adbackends.grad_and_value(lambda t: (t**2).sum())(torch.tensor([1.0, 2.0]))
    >>> g, value
    (tensor([2., 4.]), tensor(5.))
    """
    return _choose().backend.grad_and_value(func, argnums, has_aux)


def vjp(func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
    """Output of ``func`` at ``primals`` and its vector-Jacobian product function.

    Runs ``func`` now, on the active backend.

    Parameters
    ----------
    func : callable
        Called as ``func(*primals)``; returns a tensor or a pytree of them.
    *primals : pytrees of tensors
        The point.
    has_aux : bool
        ``func`` returns ``(output, aux)``.

    Returns
    -------
    tuple
        ``(output, vjp_fn)`` or ``(output, vjp_fn, aux)``. ``vjp_fn(cotangents)``
        takes cotangents shaped like ``output`` and returns a tuple with one
        product per primal.

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0])
    >>> out, vjp_fn = adbackends.vjp(lambda t: t**2, x)
    >>> vjp_fn(torch.ones(2))
    (tensor([0., 2.]),)
    """
    return _choose().backend.vjp(func, *primals, has_aux=has_aux)


def jvp(
    func: Callable[..., Any],
    primals: Any,
    tangents: Any,
    *,
    strict: bool = False,
    has_aux: bool = False,
) -> Any:
    """Output of ``func`` at ``primals`` and its Jacobian-vector product with ``tangents``.

    Runs ``func`` now, on the active backend. The loop backend computes the
    product with two reverse passes, so it runs through custom Functions
    that define only ``backward``.

    Parameters
    ----------
    func : callable
        Called as ``func(*primals)``; returns a tensor or a pytree of them.
    primals : tuple of pytrees of tensors
        The point.
    tangents : tuple of pytrees of tensors
        The direction, with the structure, shapes and dtypes of ``primals``.
    strict : bool
        Raise ``RuntimeError`` when an output does not depend on the primals.
    has_aux : bool
        ``func`` returns ``(output, aux)``.

    Returns
    -------
    tuple
        ``(output, jvp_out)`` or ``(output, jvp_out, aux)``.

    Raises
    ------
    RuntimeError
        For tangents whose structure or shapes differ from the primals', for
        ``primals``/``tangents`` that are not tuples, and with ``strict=True``
        (torch.func's types).

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0])
    >>> out, tangent = adbackends.jvp(lambda t: t**2, (x,), (torch.ones(2),))
    >>> tangent
    tensor([0., 2.])
    """
    return _choose().backend.jvp(func, primals, tangents, strict=strict, has_aux=has_aux)


def jacfwd(
    func: Callable[..., Any],
    argnums: Union[int, Tuple[int, ...]] = 0,
    has_aux: bool = False,
    *,
    randomness: str = "error",
) -> Callable[..., Any]:
    """Jacobian of ``func`` by forward-mode autodiff, on the active backend.

    Parameters
    ----------
    func : callable
        Takes positional arguments and returns a tensor or a pytree of them.
    argnums : int or tuple of int
        The argument(s) to differentiate; a tuple gives a tuple of Jacobians.
    has_aux : bool
        ``func`` returns ``(output, aux)``; the result is ``(jacobian, aux)``.
    randomness : {"error", "different", "same"}
        What random operations in ``func`` do, as for :func:`vmap`.

    Returns
    -------
    callable
        Returns the Jacobian, shaped ``output.shape + input.shape``, equal
        to :func:`jacrev`'s.

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([0.0, 1.0, 2.0])
    >>> jac = adbackends.jacfwd(torch.sin)(x)
    >>> torch.allclose(jac, torch.diag(x.cos()))
    True
    """
    backend = _choose().backend
    if _memory.limited() and _memory.max_memory() is not None:
        backend = _memory.auto_backend(backend)
    return backend.jacfwd(func, argnums, has_aux, randomness=randomness)  # type: ignore[no-any-return]


def hessian(
    func: Callable[..., Any], argnums: Union[int, Tuple[int, ...]] = 0
) -> Callable[..., Any]:
    """Hessian of ``func``, on the active backend.

    torch.func's result (values, shapes, structure, dtype), computed by
    default as ``jacrev(jacrev(func))``, which is faster on CPU than
    forward over reverse and works through custom Functions without a jvp
    rule; see :data:`adbackends.transforms.hessian_strategy`.

    Parameters
    ----------
    func : callable
        Takes positional arguments and returns a tensor or a pytree of them.
    argnums : int or tuple of int
        The argument(s) to differentiate twice; a tuple gives a nested tuple
        ``[i][j]`` of blocks.

    Returns
    -------
    callable
        Returns the Hessian, shaped ``output.shape + input.shape +
        input.shape``.

    Examples
    --------
    >>> import torch, adbackends
    >>> x = torch.tensor([1.0, 2.0])
    >>> adbackends.hessian(lambda t: (t**3).sum())(x)
    tensor([[ 6.,  0.],
            [ 0., 12.]])

    Batched Hessians compose with :func:`vmap`:

    >>> adbackends.vmap(adbackends.hessian(lambda t: (t**3).sum()))(torch.ones(4, 2)).shape
    torch.Size([4, 2, 2])
    """
    backend = _choose().backend
    if _memory.limited() and _memory.max_memory() is not None:
        backend = _memory.auto_backend(backend)
    if hessian_strategy is None:
        return backend.hessian(func, argnums)
    with _hessian.requested(hessian_strategy, "adbackends.transforms.hessian_strategy"):
        return backend.hessian(func, argnums)


def linearize(func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
    """Output of ``func`` at ``primals`` and a function for its Jacobian-vector products.

    Runs ``func`` now, on the active backend. ``jvp_fn`` reuses what was
    recorded, so many products at one point cost less than many
    :func:`jvp` calls.

    Parameters
    ----------
    func : callable
        Called as ``func(*primals)``.
    *primals : pytrees of tensors
        The point.

    Returns
    -------
    tuple
        ``(output, jvp_fn)``; ``jvp_fn(*tangents)`` returns the product,
        shaped like ``output``.

    Examples
    --------
    >>> import torch, adbackends
    >>> out, jvp_fn = adbackends.linearize(torch.sin, torch.zeros(2))
    >>> jvp_fn(torch.tensor([1.0, 2.0]))
    tensor([1., 2.])
    """
    return _choose().backend.linearize(func, *primals)
