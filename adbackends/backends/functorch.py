"""The ``functorch`` backend: the standalone package or the copy bundled with torch.

functorch 0.1/0.2 (torch 1.11/1.12) is a separate PyPI package; torch 1.13
and later bundle it. Either way it is found by ``import functorch``, never by
version number, and what this copy can do is left to the capability probes.

Older copies lack arguments that newer ones have. This backend never drops
one that changes results or memory:

* ``jacrev(chunk_size=...)`` (functorch >= 1.13) is emulated on older copies
  with ``functorch.vjp`` and ``functorch.vmap`` over chunks of basis rows, as
  functorch itself does it, so the results are the same;
* ``vmap(chunk_size=...)`` (functorch >= 1.13) is emulated by splitting the
  batch into chunks and concatenating the outputs, with torch.func's rules
  for ``randomness="same"``;
* anything else missing (``randomness`` before functorch 0.2,
  ``_preallocate_and_copy``) raises :class:`adbackends.CapabilityError`
  naming the argument, the installed version and the backends that have it.

functorch before torch 2.0 refuses every ``autograd.Function`` under its
transforms, and torch >= 2.0 refuses ctx-style ones; that refusal is raised as
:class:`adbackends.CapabilityError` (a ``RuntimeError``) that names the
backend to use instead.

On torch >= 2.0, ``functorch.jacrev`` and ``functorch.vmap`` are deprecated
wrappers that warn on every call. This backend shows one FutureWarning per
process instead and calls the implementation behind the wrapper directly.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from ..backend import ArgNums, Backend
from ..errors import CapabilityError

__all__ = ["FunctorchBackend", "chunked_jacrev", "chunked_vmap"]

_warned = False
_warn_lock = threading.Lock()

#: The fragments of functorch's messages when it refuses an autograd.Function.
_REFUSALS: Tuple[Tuple[str, str], ...] = (
    # torch >= 2.0, a Function without setup_context (ctx style)
    ("must override the setup_context staticmethod", "legacy_function"),
    # functorch 0.2 and torch 1.13: every Function, whatever its inputs
    ("do not support the use of autograd.Function", "custom_function"),
)


class FunctorchBackend(Backend):
    """functorch's ``jacrev`` and ``vmap``, with the gaps of old copies filled or refused.

    Examples
    --------
    >>> import torch, adbackends
    >>> ft = adbackends.get("functorch")  # doctest: +SKIP
    >>> ft.jacrev(torch.sin, chunk_size=2)(torch.zeros(3))  # doctest: +SKIP
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    """

    name = "functorch"
    install_hint = (
        "torch >= 1.13 bundles functorch; for torch 1.12 install the matching "
        "standalone package: pip install functorch==0.2.1"
    )

    def load(self) -> None:
        with warnings.catch_warnings():
            # Importing the deprecated package may warn; the once-per-process
            # notice is given on first use instead.
            warnings.simplefilter("ignore")
            import functorch
        self._module = functorch
        self._jacrev, self._deprecated = _undeprecated(functorch.jacrev)
        self._vmap, _ = _undeprecated(functorch.vmap)
        self._vjp, _ = _undeprecated(functorch.vjp)
        self._jacrev_params = _parameters(self._jacrev)
        self._vmap_params = _parameters(self._vmap)

    @property
    def version(self) -> str:
        version = getattr(self._module, "__version__", None)
        if version is None:
            import torch

            return f"bundled with torch {torch.__version__}"
        return str(version)

    # -- the transforms -------------------------------------------------------

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        if self._deprecated:
            _warn_once()
        kwargs: Dict[str, Any] = {"has_aux": has_aux}
        if _preallocate_and_copy:
            self._require(self._jacrev_params, "jacrev", "_preallocate_and_copy", "chunk_size")
            kwargs["_preallocate_and_copy"] = True
        if chunk_size is not None:
            if not self._knows(self._jacrev_params, "chunk_size"):
                _check_chunk_size(chunk_size, "jacrev: `chunk_size` should be greater than 0.")
                return self._refusing(
                    chunked_jacrev(self._vjp, self._vmap, func, argnums, has_aux, chunk_size)
                )
            kwargs["chunk_size"] = chunk_size
        if _negative(argnums):
            # functorch 0.2 silently returns zeros for a negative argnums;
            # count from the front once the number of arguments is known.
            native = self._jacrev

            @functools.wraps(func)
            def jacobian(*args: Any) -> Any:
                positions = _positions(argnums, len(args))
                nums = positions if isinstance(argnums, tuple) else positions[0]
                return native(func, nums, **kwargs)(*args)

            return self._refusing(jacobian)
        return self._refusing(self._jacrev(func, argnums, **kwargs))

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        if self._deprecated:
            _warn_once()
        kwargs: Dict[str, Any] = {}
        if randomness != "error":
            self._require(self._vmap_params, "vmap", "randomness", "randomness")
        if self._knows(self._vmap_params, "randomness"):
            kwargs["randomness"] = randomness
        if chunk_size is not None:
            if not self._knows(self._vmap_params, "chunk_size"):
                _check_chunk_size(
                    chunk_size,
                    f"vmap: chunk_size should be None or greater than 0. (got {chunk_size})",
                )
                vmap = functools.partial(self._vmap, **kwargs)
                return self._refusing(
                    chunked_vmap(vmap, func, in_dims, out_dims, randomness, chunk_size)
                )
            kwargs["chunk_size"] = chunk_size
        return self._refusing(self._vmap(func, in_dims, out_dims, **kwargs))

    # -- gaps -----------------------------------------------------------------

    @staticmethod
    def _knows(params: Optional[FrozenSet[str]], name: str) -> bool:
        return params is None or name in params

    def _require(
        self, params: Optional[FrozenSet[str]], api: str, name: str, capability: str
    ) -> None:
        """Refuse an argument this functorch does not have (never drop it)."""
        if self._knows(params, name):
            return
        raise CapabilityError(
            self.name,
            capability,
            f"functorch {self.version} has no {api}({name}=...)",
            _alternatives(capability, self.name),
            detail=f"{api}({name}=...)",
        )

    def _refusing(self, transformed: Callable[..., Any]) -> Callable[..., Any]:
        """Turn functorch's refusal of an autograd.Function into a CapabilityError."""
        backend = self

        @functools.wraps(transformed)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return transformed(*args, **kwargs)
            except CapabilityError:
                raise
            except RuntimeError as exc:
                capability = _refused(exc)
                if capability is None:
                    raise
                raise backend._function_error(capability, exc) from exc

        return call

    def _function_error(self, capability: str, exc: BaseException) -> CapabilityError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        import torch

        torch_note = (
            "" if self.version == str(torch.__version__) else f" (torch {torch.__version__})"
        )
        what = (
            "a ctx-style autograd.Function (forward(ctx, ...)) under a transform"
            if capability == "legacy_function"
            else "any autograd.Function under a transform"
        )
        return CapabilityError(
            self.name,
            capability,
            f"functorch {self.version}{torch_note} refuses {what}: {first}",
            # Only cached probe results: this runs inside the user's
            # transforms, where a new probe must not run.
            _cached_alternatives(capability, self.name),
        )


# -- emulation for old functorch -------------------------------------------------


def _check_chunk_size(chunk_size: Any, message: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(message)


def _positions(argnums: ArgNums, num_args: int) -> Tuple[int, ...]:
    """Validate ``argnums`` as functorch does and return the positions."""
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        nums: Tuple[Any, ...] = (argnums,)
    elif isinstance(argnums, tuple):
        nums = argnums
    else:
        raise RuntimeError(f"argnums must be int or Tuple[int, ...], got: {type(argnums)}")
    if len(nums) == 0:
        raise RuntimeError("argnums must be non-empty")
    positions = []
    for num in nums:
        if not isinstance(num, int) or isinstance(num, bool):
            raise RuntimeError(f"argnums must be int or Tuple[int, ...], got: {type(argnums)}")
        if not -num_args <= num < num_args:
            raise RuntimeError(f"Got argnums={argnums}, but only {num_args} positional inputs")
        positions.append(num % num_args if num_args else num)
    if len(set(positions)) != len(positions):
        raise RuntimeError(f"argnums elements must be unique, got {argnums}")
    return tuple(positions)


def _negative(argnums: Any) -> bool:
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    return any(isinstance(n, int) and n < 0 for n in nums)


def _basis_rows(flat_output: Sequence[Any], start: int, stop: int) -> List[Any]:
    """Rows ``start:stop`` of the identity over all output elements, split per output.

    Row ``r`` is the cotangent that picks output element ``r``; each piece has
    its output's dtype, device and shape, with the rows in front.
    """
    import torch

    pieces = []
    offset = 0
    rows = stop - start
    for out in flat_output:
        numel = out.numel()
        piece = out.new_zeros((rows, numel))
        lo, hi = max(start, offset), min(stop, offset + numel)
        if lo < hi:
            idx = torch.arange(lo, hi, device=out.device)
            piece[idx - start, idx - offset] = 1
        pieces.append(piece.view((rows, *out.shape)))
        offset += numel
    return pieces


def chunked_jacrev(
    vjp: Callable[..., Any],
    vmap: Callable[..., Any],
    func: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    chunk_size: int,
) -> Callable[..., Any]:
    """``jacrev(func, argnums, has_aux=..., chunk_size=...)`` from ``vjp`` and ``vmap``.

    The Jacobian is built ``chunk_size`` rows at a time: one ``vjp`` of
    ``func``, then ``vmap(vjp_fn)`` over each chunk of standard-basis rows
    (with ``chunk_size=1``, plain calls of ``vjp_fn``, so vmap's limits do not
    apply), and the chunks are concatenated. This is how functorch >= 1.13
    computes it, so results and output structure agree.

    Parameters
    ----------
    vjp, vmap : callable
        functorch's ``vjp`` and ``vmap``.
    func, argnums, has_aux, chunk_size
        As for ``torch.func.jacrev``; ``chunk_size`` must be a positive int.

    Returns
    -------
    callable
        The Jacobian function.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        positions = _positions(argnums, len(args))

        def partial(*primals: Any) -> Any:
            full = list(args)
            for pos, value in zip(positions, primals):
                full[pos] = value
            return func(*full)

        primals = tuple(args[pos] for pos in positions)
        if has_aux:
            output, vjp_fn, aux = vjp(partial, *primals, has_aux=True)
        else:
            output, vjp_fn = vjp(partial, *primals)
        flat_output, output_spec = tree_flatten(output)
        flat_primals, primals_spec = tree_flatten(primals)
        numels = [out.numel() for out in flat_output]
        total = sum(numels)

        chunks: List[List[Any]] = []
        for start in range(0, max(total, 1), chunk_size):
            stop = min(start + chunk_size, total)
            basis = _basis_rows(flat_output, start, stop)
            if stop - start == 1 and chunk_size == 1:
                rows = vjp_fn(tree_unflatten([b[0] for b in basis], output_spec))
                chunks.append([r.unsqueeze(0) for r in tree_flatten(rows)[0]])
            else:
                rows = vmap(vjp_fn)(tree_unflatten(basis, output_spec))
                chunks.append(tree_flatten(rows)[0])
        if len(chunks) == 1:
            flat_rows = chunks[0]
        else:
            flat_rows = [torch.cat(parts, 0) for parts in zip(*chunks)]

        # One (total, *primal.shape) block per primal leaf: split it by output.
        per_primal = [
            [
                part.view(tuple(out.shape) + tuple(primal.shape))
                for part, out in zip(rows.split(numels, dim=0), flat_output)
            ]
            for rows, primal in zip(flat_rows, flat_primals)
        ]
        per_output = [tree_unflatten(list(blocks), primals_spec) for blocks in zip(*per_primal)]
        if not isinstance(argnums, tuple):
            per_output = [jac[0] for jac in per_output]
        jacobian = tree_unflatten(per_output, output_spec)
        return (jacobian, aux) if has_aux else jacobian

    return wrapper


def chunked_vmap(
    vmap: Callable[..., Any],
    func: Callable[..., Any],
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    chunk_size: int,
) -> Callable[..., Any]:
    """``vmap(func, in_dims, out_dims, randomness, chunk_size=...)`` from a plain ``vmap``.

    The batch is cut into chunks of ``chunk_size`` samples, each chunk is
    mapped with ``vmap``, and the outputs are concatenated along their
    ``out_dims``. As in torch.func, ``randomness="same"`` restarts the random
    number generator at the same state for every chunk. Anything vmap itself
    would reject (bad ``in_dims``, mismatched batch sizes) is passed to
    ``vmap`` unchunked, so the error is vmap's own.

    Parameters
    ----------
    vmap : callable
        ``vmap(func, in_dims, out_dims)`` without ``chunk_size`` (with the
        ``randomness`` already bound).
    func, in_dims, out_dims, randomness, chunk_size
        As for ``torch.func.vmap``; ``chunk_size`` must be a positive int.

    Returns
    -------
    callable
        The mapped function.
    """
    import torch
    from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

    whole = vmap(func, in_dims, out_dims)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat_args, args_spec = tree_flatten(args)
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        if not isinstance(in_dims, (int, tuple)) and in_dims is not None:
            return whole(*args, **kwargs)
        flat_dims = _broadcast_to_and_flatten(dims, args_spec) if args else None
        if flat_dims is None:
            return whole(*args, **kwargs)
        sizes = set()
        for arg, dim in zip(flat_args, flat_dims):
            if dim is None:
                continue
            if not isinstance(arg, torch.Tensor) or not isinstance(dim, int):
                return whole(*args, **kwargs)
            if not -arg.dim() <= dim < arg.dim():
                return whole(*args, **kwargs)
            sizes.add(arg.size(dim))
        if len(sizes) != 1:
            return whole(*args, **kwargs)  # no batched input, or mismatched sizes
        (batch,) = sizes

        state = torch.get_rng_state() if randomness == "same" else None
        outputs = []
        for start in range(0, batch, chunk_size):
            rows = min(chunk_size, batch - start)
            chunk = [
                arg if dim is None else arg.narrow(dim, start, rows)
                for arg, dim in zip(flat_args, flat_dims)
            ]
            if state is not None:
                torch.set_rng_state(state)
            outputs.append(whole(*tree_unflatten(chunk, args_spec), **kwargs))
        if not outputs:  # an empty batch: let vmap say what it does with it
            return whole(*args, **kwargs)

        flat_outputs = [tree_flatten(out) for out in outputs]
        out_spec = flat_outputs[0][1]
        flat_out_dims = _broadcast_to_and_flatten(out_dims, out_spec)
        if flat_out_dims is None:
            raise ValueError(
                f"vmap: out_dims is not compatible with the structure of the outputs: "
                f"out_dims={out_dims}"
            )
        joined = [
            torch.cat([leaves[i] for leaves, _ in flat_outputs], dim=dim)
            for i, dim in enumerate(flat_out_dims)
        ]
        return tree_unflatten(joined, out_spec)

    return wrapper


# -- plumbing ---------------------------------------------------------------------


def _undeprecated(api: Callable[..., Any]) -> Tuple[Callable[..., Any], bool]:
    """The function behind functorch's deprecation wrapper, and whether it was one.

    torch >= 2.0 exposes ``functorch.<api>`` as a wrapper in
    ``torch._functorch.deprecated`` that warns and calls the torch.func
    implementation; every other copy exposes the implementation itself.
    """
    if getattr(api, "__module__", "") != "torch._functorch.deprecated":
        return api, False
    import torch.func

    name = api.__name__
    target = getattr(torch.func, name, None)
    if callable(target) and getattr(target, "__module__", "") != api.__module__:
        return target, True
    return api, True


def _parameters(api: Callable[..., Any]) -> Optional[FrozenSet[str]]:
    try:
        return frozenset(inspect.signature(api).parameters)
    except (TypeError, ValueError):  # a C function or an unusual wrapper
        return None


def _refused(exc: BaseException) -> Optional[str]:
    """The capability an autograd.Function refusal shows is missing, if it is one."""
    text = str(exc)
    for fragment, capability in _REFUSALS:
        if fragment in text:
            return capability
    return None


def _alternatives(capability: str, own: str) -> List[str]:
    """Other built-in backends here that pass ``capability``.

    This backend is left out: its own probe may be what is asking.
    """
    from ..errors import BackendUnavailableError
    from ..registry import AUTO_ORDER, REGISTRY

    names = []
    for name in AUTO_ORDER:
        if name == own:
            continue
        try:
            backend = REGISTRY.get(name)
        except BackendUnavailableError:
            continue
        if backend.supports(capability):
            names.append(name)
    return names


def _cached_alternatives(capability: str, own: str) -> List[str]:
    """Backends already probed here that have ``capability`` (no new probe runs)."""
    from ..probes import _CACHE_ATTR
    from ..registry import AUTO_ORDER, REGISTRY

    names = []
    for name in AUTO_ORDER:
        backend = REGISTRY._loaded.get(name)
        if backend is None or name == own:
            continue
        support = backend.__dict__.get(_CACHE_ATTR, {}).get(capability)
        if support is not None and support.ok:
            names.append(name)
    if not names and capability in ("custom_function", "legacy_function"):
        # The loop backend uses torch.autograd.grad only, which runs every
        # autograd.Function on every torch.
        names.append("loop")
    return names


def _warn_once() -> None:
    global _warned
    if _warned:
        return
    from ..probes import probing

    if probing():  # a probe hides its warnings: keep the notice for the user
        return
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        "functorch is deprecated since torch 2.0 and will be removed from a "
        "future torch; the 'functorch' backend still works, but 'torch.func' "
        "offers the same transforms: adbackends.use('torch.func') or "
        "TAD_AD_BACKEND=torch.func",
        FutureWarning,
        stacklevel=3,
    )
