"""One-call metric functions over a single set of maps (one category)."""
from __future__ import annotations

from fastproto.metrics import _inputs
from fastproto.metrics.components import split_pixels
from fastproto.metrics.curves import exact_metrics
from fastproto.metrics.evaluator import Evaluator


def compute_metrics(anomaly_maps, masks, image_scores=None, image_labels=None, *, protocol: str = "exact",
                    image_score: str = "max", topk: float = 0.01, fpr_limit: float = 0.3, resolution=None,
                    connectivity: int = 8, mask_threshold: float = 0.5, **options) -> dict[str, float]:
    """The seven AD metrics and their mean for one set of maps (treated as one category).

    Returns a dict with ``i_auroc, i_ap, i_f1max, p_auroc, p_ap, p_f1max, aupro, mad``. See
    :class:`~fastproto.metrics.Evaluator` for the options and protocols.
    """
    ev = Evaluator(protocol, image_score=image_score, topk=topk, fpr_limit=fpr_limit, resolution=resolution,
                   connectivity=connectivity, mask_threshold=mask_threshold, **options)
    ev.update(anomaly_maps, masks, image_scores=image_scores, image_labels=image_labels)
    return ev.compute()["all"]


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3, protocol: str = "exact", *, connectivity: int = 8,
          mask_threshold: float = 0.5) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by it (MVTec AD definition).

    ``protocol="exact"`` is the MVTec AD official algorithm (exact); ``"binned"`` / legacy protocols as in
    :class:`~fastproto.metrics.Evaluator`.
    """
    if protocol != "exact":
        ev = Evaluator(protocol, fpr_limit=fpr_limit, connectivity=connectivity, mask_threshold=mask_threshold)
        ev.update(anomaly_maps, masks)
        return ev.compute()["all"]["aupro"]
    maps = _inputs.prepare_maps(anomaly_maps)
    masks = _inputs.prepare_masks(masks, maps.shape, "masks", maps.device, mask_threshold)
    split = split_pixels(maps, masks, connectivity)
    return exact_metrics([split.neg], split.pos, split.pos_sizes, split.n_regions, fpr_limit)["aupro"]
