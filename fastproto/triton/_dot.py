"""Matrix products inside the Triton kernels, at the input's precision class.

16-bit inputs: operands in the input dtype (tensor cores), float32 accumulation; this is the rounding
the inputs already carry (the float32 reference upcasts the same 16-bit values), plus the one
rounding of an operand computed in float32 (e.g. ``phi(k)``) back to 16 bits.
float32 inputs: ``tf32x3`` (three TF32 tensor-core products: a split of each operand into a TF32
head and a TF32 tail; error ~1e-6 relative, against ~1e-3 for plain TF32), or ``ieee`` (FMA, exact
float32, ~10x slower) under the interpreter, where precision flags do not apply anyway and where
products of 16-bit operands are not computed as floating point (so the interpreter always multiplies
in float32: the 16-bit operand path is exercised by the GPU tests only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastproto.triton import interpreter_enabled

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# read once, as Triton does when the kernels are defined (at import): a later change of TRITON_INTERPRET does not
# turn jitted kernels into interpreted ones, and the launchers skip an environment lookup per launch
_CONFIGS = {dtype: ((tl.float32, "ieee") if interpreter_enabled() else (dot, "tf32x3"))
            for dtype, dot in _DOT_DTYPES.items()}


def dot_config(dtype: torch.dtype):
    """``(DOT_DT, PREC)`` constexprs for :func:`mm` given the kernel's input dtype."""
    if dtype not in _CONFIGS:
        raise TypeError(f"no Triton matrix-product configuration for dtype {dtype}")
    return _CONFIGS[dtype]


@triton.jit
def mm(a, b, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with float32 accumulation; operands cast to ``DOT_DT``."""
    if DOT_DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a.to(DOT_DT), b.to(DOT_DT))
