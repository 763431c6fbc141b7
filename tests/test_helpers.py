"""The test suite's own instruments: the interpreter harness's bfloat16 rounding is the GPU's
(``tests/_interpreter.py``), and the error measure means what it says (``tests/_tensors.py``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import _interpreter
from tests._tensors import rel_err, strided_leaf


def test_bfloat16_bits_round_to_nearest_even_like_torch(rng):
    """Random magnitudes over the whole float32 range, exact ties (both parities), overflow to infinity,
    subnormals, signed zeros and infinities: the same bits as torch's conversion; NaN stays NaN."""
    magnitudes = np.clip(rng.standard_normal(20000) * 10.0 ** rng.uniform(-46, 39, 20000), -3.4e38, 3.4e38)
    values = magnitudes.astype(np.float32)  # down to float32's subnormals (and zero below them)
    ties = (rng.integers(0, 1 << 16, 2000).astype(np.uint32) << 16 | 0x8000).view(np.float32)
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 3.3961e38, 3.4028235e38, 1e-45, -1e-45, 1.1754942e-38],
                       dtype=np.float32)
    values = np.concatenate([values, ties, special])
    values = values[~np.isnan(values)]  # random tie patterns include NaNs; their payloads are checked below
    want = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    got = _interpreter.bfloat16_bits(values)
    assert got.dtype == np.uint16 and np.array_equal(got, want), int((got != want).sum())
    nan = _interpreter.bfloat16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).isnan().all()


def test_the_interpreter_cast_rounds_after_the_patch():
    """The patched interpreter builder converts float32 to bfloat16 by rounding (1 + 3/4 ulp rounds up; the
    unpatched interpreter truncates it); other casts keep their behaviour; the patch applies once."""
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime import interpreter

    _interpreter.round_bfloat16_like_the_gpu()
    _interpreter.round_bfloat16_like_the_gpu()
    assert interpreter.InterpreterBuilder.cast_impl._rounds_to_nearest
    builder = interpreter.InterpreterBuilder()
    x = np.array([1.0 + 3 * 2.0 ** -9, -2.5, 7.0], dtype=np.float32)  # 1 + 3/4 bf16 ulp: rounds up
    out = builder.cast_impl(interpreter.TensorHandle(x, tl.float32), tl.bfloat16)
    assert out.dtype == tl.bfloat16
    assert np.array_equal(out.data, torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))
    back = builder.cast_impl(out, tl.float32)
    assert np.array_equal(back.data.view(np.float32), np.array([1.0078125, -2.5, 7.0], dtype=np.float32))


def test_rel_err_is_the_max_error_over_the_max_magnitude():
    want = torch.tensor([1.0, -4.0, 0.5])
    assert rel_err(want + torch.tensor([0.0, 0.0, 0.2]), want) == pytest.approx(0.05)
    assert rel_err(np.array([1.0, -4.0, 0.5]), want.numpy()) == 0.0  # arrays too
    assert rel_err(torch.tensor([0.001]), torch.tensor([0.0]), floor=1.0) == pytest.approx(0.001)  # floor
    assert rel_err(torch.empty(0), torch.empty(0)) == 0.0
    assert not rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) <= 1.0  # a NaN fails any bound
    assert rel_err(torch.tensor([1.0], requires_grad=True) * 2, torch.tensor([1.0])) == 1.0  # detached


def test_strided_leaf_keeps_the_layout_and_takes_gradients():
    store = torch.full((2, 6, 10), float("nan"))
    view = store[:, ::2, :4]  # gaps: every second row, a padded last dim
    view.copy_(torch.randn(2, 3, 4))
    assert view.detach().clone().stride() != view.stride()  # why the helper exists
    leaf = strided_leaf(view)
    assert leaf.stride() == view.stride() and torch.equal(leaf.detach(), view)
    (grad,) = torch.autograd.grad((leaf * 3).sum(), [leaf])
    assert torch.equal(grad, torch.full((2, 3, 4), 3.0))
    plain = torch.randn(3)
    assert strided_leaf(plain).is_leaf and strided_leaf(plain).requires_grad and strided_leaf(None) is None
