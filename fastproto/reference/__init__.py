"""Plain-PyTorch reference of every op: the ground truth for tests and the CPU fallback.

Submodules are exposed as modules (not re-exported functions) so that an op's reference and its
public wrapper in ``fastproto.ops`` can share a name without shadowing each other.
"""
from fastproto.reference import anomaly_map, metrics  # noqa: F401  (op and metric references)
from fastproto.reference import linear_attention  # noqa: F401,E402  (linear attention reference)
from fastproto.reference import prototype  # noqa: F401,E402  (prototype attention / routing reference)
from fastproto.reference import losses  # noqa: F401,E402  (mining cosine / coherence loss reference)
from fastproto.reference import sinkhorn  # noqa: F401,E402  (batched log-domain Sinkhorn reference)
from fastproto.reference import layer_norm  # noqa: F401,E402  (residual add + LayerNorm reference)
from fastproto.reference import linear_gelu  # noqa: F401,E402  (Linear + exact GELU reference)
