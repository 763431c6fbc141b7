"""Helpers shared by the op tests: the error measure, and inputs that keep their layout through autograd."""
from __future__ import annotations

import numpy as np
import torch


def rel_err(got, want, floor: float = 1e-30) -> float:
    """``max |got - want| / max(max |want|, floor)`` in float64 (tensors or arrays; 0 for empty ``want``).

    ``floor`` keeps the measure meaningful where ``want`` is near zero: gradients of O(1) inputs use 1 (e.g. with a
    single key the attention output does not depend on q, so dq is rounding noise)."""
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got).detach().double()
    want = torch.as_tensor(np.asarray(want) if not isinstance(want, torch.Tensor) else want).detach().double()
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max()) / max(float(want.abs().max()), floor)


def strided_leaf(t):
    """A fresh tensor with ``t``'s values *and strides* that gradients can be taken for (None for None).

    ``t.detach().clone()`` makes a view with gaps (a padded last dim, every second token) contiguous, so a kernel
    would never see the strides a test built. Here a view gets a copy of its base, requiring grad, and the same
    view of it; ``torch.autograd.grad`` takes the view itself as an input."""
    if t is None:
        return None
    if t._base is None or t.is_contiguous():
        return t.detach().clone().requires_grad_(True)
    root = t._base
    base = torch.empty_strided(root.size(), root.stride(), dtype=root.dtype, device=root.device)
    base.copy_(root.detach())
    base.requires_grad_(True)
    view = base.as_strided(t.size(), t.stride(), base.storage_offset() + t.storage_offset() - root.storage_offset())
    assert view.stride() == t.stride() and torch.equal(view.detach().nan_to_num(), t.detach().nan_to_num())
    return view
