"""fastproto: prototype-based multi-class visual anomaly detection.

Fused GPU ops, an exact and fast evaluator for the standard AD metrics, and models.
``fastproto.info()`` reports versions and which implementations are active.
"""
__version__ = "0.1.0"

from fastproto import metrics, ops  # noqa: E402,F401
from fastproto.info import info  # noqa: E402,F401

__all__ = ["metrics", "ops", "info", "__version__"]
