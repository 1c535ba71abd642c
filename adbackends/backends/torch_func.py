"""The ``torch.func`` backend: PyTorch's own composable transforms (torch >= 2.0)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .._shared import ArgNums
from ..backend import Backend, Refusal
from ._native_refusals import classify

__all__ = ["TorchFuncBackend"]


class TorchFuncBackend(Backend):
    """``torch.func.jacrev`` and ``torch.func.vmap``, passed through unchanged."""

    name = "torch.func"
    install_hint = "torch.func ships with torch >= 2.0: pip install 'torch>=2.0'"

    def load(self) -> None:
        try:
            import torch.func as func
        except ImportError as exc:
            import torch

            raise ImportError(
                f"torch {torch.__version__} has no torch.func (it arrived in torch 2.0)"
            ) from exc
        self._func = func

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        return self._func.jacrev(
            func,
            argnums,
            has_aux=has_aux,
            chunk_size=chunk_size,
            _preallocate_and_copy=_preallocate_and_copy,
        )

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        return self._func.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)

    def cannot_transform(self, exc: BaseException) -> Optional[Refusal]:
        return classify(exc)
