"""The public transforms: ``jacrev``, ``vmap``, ``fjacrev`` and ``fvmap``.

Each is a thin function with torch.func's exact signature that hands over to
the active backend (see :func:`adbackends.current`). The backend is looked up
when the transform is created, so ``adbackends.jacrev(f)`` built inside
``with adbackends.using("loop"):`` keeps using the loop backend when it is
called later.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

from .selection import _choose

__all__ = ["fjacrev", "fvmap", "jacrev", "vmap"]


def jacrev(
    func: Callable[..., Any],
    argnums: Union[int, Tuple[int, ...]] = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
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
    chunk_size : int or None
        How many Jacobian rows to compute at a time; ``None`` is all at once,
        ``1`` is row by row. Lower it to bound memory.

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
    return _choose().backend.jacrev(
        func,
        argnums,
        has_aux=has_aux,
        chunk_size=chunk_size,
        _preallocate_and_copy=_preallocate_and_copy,
    )


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: Optional[int] = None,
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
    chunk_size : int or None
        How many samples to process at a time. Lower it to bound memory.

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
    return _choose().backend.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)


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
