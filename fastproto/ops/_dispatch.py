"""Dispatch between implementations, in one place for every op family.

``impl`` is ``"auto"`` (the fastest implementation that supports the inputs, else the reference),
``"triton"``, ``"cuda"`` (forced: raise with the reason when it cannot run) or ``"reference"``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import typing
import warnings
from typing import Callable, Optional, Sequence

import torch

from fastproto import _ext
from fastproto import triton as _triton_pkg

IMPLS = ("auto", "triton", "cuda", "reference")
_WARNED: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def is_finite_real(value) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN. Comparisons rather than ``math.isfinite``:
    under ``torch.compile(dynamic=True)`` a float argument may be symbolic, which ``math.isfinite`` cannot take."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and -math.inf < float(value) < math.inf


def finite_number(op: str, name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a float after checking it is a finite real number > 0 (>= 0 with ``allow_zero``); a clear
    error naming the op and the argument otherwise (bools refused)."""
    if not (is_finite_real(value) and (float(value) > 0 or (allow_zero and float(value) == 0))):
        raise ValueError(f"{op}: {name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def device_guard(device: torch.device):
    """Make ``device`` current for kernel launches; a no-op (no context switch) when it already is."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class _InferenceContext:
    """What an op's ``autograd.Function.forward`` gets instead of an autograd context when no gradient can flow:
    saved tensors and attributes are dropped with it."""

    def __init__(self, num_inputs: int):
        self.needs_input_grad = (False,) * num_inputs

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply(fn, *args):
    """``fn.apply(*args)`` for an op's ``torch.autograd.Function``, or, when autograd would record nothing (grad
    mode off, or no tensor argument requires grad), ``fn.forward`` on an inert context: the same outputs without
    the ``Function.apply`` machinery (about 10 us of host time per call, most of an inference op's overhead
    besides the kernel launch). Under ``torch.compile`` always ``fn.apply``: dynamo traces the Function itself."""
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return fn.apply(*args)
    return fn.forward(_InferenceContext(len(args)), *args)


def _none_output() -> torch.Tensor:
    """How a kernel op returns a None output through the operator boundary (operators return tensors only):
    an empty 1-D bool tensor, a dtype no kernel output has."""
    return torch.empty(0, dtype=torch.bool)


def _is_none_output(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool and t.dim() == 1 and t.shape[0] == 0


def kernel_op(name: str, *, fake: Optional[Callable] = None):
    """Decorator for a function that launches kernels (Triton or the compiled extension's) and returns a tensor
    or a tuple of tensors and Nones: registers it as the custom operator ``torch.ops.fastproto.<name>``, which
    ``torch.compile`` keeps as one opaque call with known output shapes (dynamo cannot trace into a Triton
    launcher). The function's annotations give the operator's schema.

    Its fake (shape-only) implementation is the function itself by default: the Triton launchers allocate their
    outputs and skip their launches on fake tensors (:func:`fastproto.triton.shapes_only`), and the compiled
    extension's operators have no-op fakes (:mod:`fastproto._ext`), so outputs' shapes, dtypes and strides come
    from the one allocation code. ``fake`` overrides it (a function of the same arguments).

    Outside compilation the decorated name calls the function directly: the operator's dispatch would add
    about 10 us of host time per call."""

    def wrap(fn):
        hints = typing.get_type_hints(fn)
        single = hints.pop("return") is torch.Tensor
        sig = inspect.signature(fn)
        sig = sig.replace(parameters=[prm.replace(annotation=hints[prm.name]) for prm in sig.parameters.values()],
                          return_annotation=list[torch.Tensor])

        def boxed(impl):
            def run(*args, **kwargs):
                out = impl(*args, **kwargs)
                return [out] if single else [_none_output() if t is None else t for t in out]

            run.__signature__ = sig
            return run

        op = torch.library.custom_op(f"fastproto::{name}", boxed(fn), mutates_args=())
        op.register_fake(boxed(fake or fn))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            out = op(*args, **kwargs)
            return out[0] if single else tuple(None if _is_none_output(t) else t for t in out)

        call.op = op
        return call

    return wrap


def _compiled_missing(compiled_op: Optional[str]) -> Optional[str]:
    """Why the compiled extension cannot run ``compiled_op`` on CUDA tensors (None when it can)."""
    if compiled_op is None:
        return "this op has no compiled CUDA kernel"
    if not _ext.available():
        return f"the compiled extension fastproto._C is not loaded ({_ext.load_error()})"
    if not _ext.has_op(compiled_op, "cuda"):
        return ("the compiled extension was built without CUDA (reinstall with nvcc and a CUDA build of torch, "
                "or FASTPROTO_CUDA=1)")
    return None


def resolve_impl(op: str, impl: str, tensors: Sequence[torch.Tensor], *, impls: Sequence[str] = ("triton",),
                 has_backward: bool = True, unsupported: Optional[Callable[[], Optional[str]]] = None,
                 compiled_op: Optional[str] = None) -> str:
    """Return the implementation to run: one of ``impls`` (those the op has besides the reference) or
    ``"reference"``.

    Args:
        op: op name, for messages.
        impl: the user's choice.
        tensors: the inputs (device and requires_grad decide).
        impls: fast implementations this op provides, in order of preference.
        has_backward: False for forward-only kernels: inputs that require grad go to the reference
            under ``"auto"`` and are refused when a fast path is forced.
        unsupported: returns a reason string when the inputs are outside what the kernels handle (e.g. a
            head dim); ``"auto"`` then falls back to the reference with a one-time warning.
        compiled_op: the ``torch.ops.fastproto`` operator behind ``"cuda"`` (when ``impls`` has it): that
            path runs only when the extension was built with CUDA.
    """
    allowed = ("auto", *impls, "reference")
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    if impl == "reference":
        return "reference"
    device = tensors[0].device
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    reason = unsupported() if unsupported is not None else None
    if impl == "auto":
        if device.type != "cuda" or (needs_grad and not has_backward):
            return "reference"
        for candidate in impls:
            if candidate == "triton" and not _triton_pkg.is_available():
                continue
            if candidate == "cuda" and _compiled_missing(compiled_op):
                continue
            if reason:
                warn_once(f"{op}:{reason}", f"{op}: {reason}; using the reference implementation")
                return "reference"
            return candidate
        return "reference"
    if impl == "triton":
        if not _triton_pkg.is_available():
            raise RuntimeError(f"{op}: impl='triton' requested but the triton package cannot be imported")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_pkg.interpreter_enabled()):
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors, got tensors on {device}; on the CPU the Triton "
                "kernels run only under the interpreter (TRITON_INTERPRET=1, for tests). "
                "Use impl='auto' or impl='reference'.")
    else:  # impl == "cuda"
        if device.type != "cuda":
            raise RuntimeError(f"{op}: impl='cuda' needs CUDA tensors, got tensors on {device}")
        missing = _compiled_missing(compiled_op)
        if missing:
            raise RuntimeError(f"{op}: impl='cuda' requested but {missing}")
    if needs_grad and not has_backward:
        raise RuntimeError(
            f"{op}: the {impl} path is forward-only (an inference op) and an input requires grad; "
            "call it under torch.no_grad(), detach the inputs, or use impl='reference' / impl='auto' "
            "(which routes grad-requiring inputs to the differentiable reference).")
    if reason:
        raise RuntimeError(f"{op}: impl={impl!r} cannot run these inputs: {reason}")
    return impl


def set_impl(module: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Set ``impl`` on ``module`` and on every submodule that has a string ``impl`` attribute (the fastproto
    modules: attention, LayerNorm, MLP, blocks), so that the whole model runs its ops with one choice; returns
    ``module``. An op that lacks the chosen implementation says so when it is called."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"set_impl: impl must be one of {IMPLS}, got {impl!r}")
    for sub in module.modules():
        if isinstance(getattr(sub, "impl", None), str):
            sub.impl = impl
    return module
