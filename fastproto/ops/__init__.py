"""Fused ops: functional API + nn.Module per op family, dispatching between implementations
(``impl="auto"|"triton"|"reference"``; see each module), and :func:`convert`, which puts them into an
existing model.

The functions below shadow the submodule names on this package (``fastproto.ops.anomaly_map`` is
the function); import a submodule by its full name (``from fastproto.ops.anomaly_map import ...``)
to reach its other members.
"""
from fastproto.ops.anomaly_map import AnomalyMap, anomaly_map, gaussian_blur, image_score  # noqa: F401
from fastproto.ops.linear_attention import LinearAttention, LinearCrossAttention, linear_attention  # noqa: F401
from fastproto.ops.prototype import PrototypeAttention, prototype_attention, route  # noqa: F401
from fastproto.ops.layer_norm import LayerNorm, add_layer_norm, layer_norm, pre_norm  # noqa: F401,E402
from fastproto.ops.linear_gelu import Mlp, fc_gelu, linear_gelu  # noqa: F401,E402
from fastproto.ops.losses import coherence_loss, cosine_mining_loss  # noqa: F401,E402
from fastproto.ops.sinkhorn import ot_alignment_loss, sinkhorn  # noqa: F401,E402
from fastproto.ops._dispatch import set_impl  # noqa: F401,E402
from fastproto.ops.convert import convert  # noqa: F401,E402

__all__ = ["anomaly_map", "gaussian_blur", "image_score", "AnomalyMap", "linear_attention", "LinearAttention",
           "LinearCrossAttention", "prototype_attention", "PrototypeAttention", "route",
           "cosine_mining_loss", "coherence_loss", "layer_norm", "add_layer_norm", "pre_norm", "LayerNorm",
           "linear_gelu", "fc_gelu", "Mlp", "sinkhorn", "ot_alignment_loss", "convert", "set_impl"]
