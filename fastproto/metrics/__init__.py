"""Exact, fast, memory-bounded evaluation of the standard anomaly-detection metrics.

``compute_metrics`` for one set of maps, ``Evaluator`` for streaming per-category evaluation (exact,
binned with error bounds, and the legacy protocols of published codes), ``aupro`` and
``connected_components``.
"""
from fastproto.metrics.components import connected_components
from fastproto.metrics.evaluator import METRICS, PROTOCOLS, Evaluator
from fastproto.metrics.functional import aupro, compute_metrics

__all__ = ["compute_metrics", "Evaluator", "aupro", "connected_components", "METRICS", "PROTOCOLS"]
