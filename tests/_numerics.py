"""Error measures shared by the op tests."""
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
