"""Random anomaly maps and masks with the edge cases the metrics must survive."""
import numpy as np
import scipy.ndimage as nd


def blob_masks(rng, B, H, W, max_blobs=3, frac_anomalous=0.6):
    masks = np.zeros((B, H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    for b in range(B):
        if rng.random() > frac_anomalous:
            continue
        for _ in range(rng.integers(1, max_blobs + 1)):
            kind = rng.integers(0, 4)
            if kind == 0:  # one pixel
                masks[b, rng.integers(0, H), rng.integers(0, W)] = True
            elif kind == 1:  # diagonal line (8-connected only)
                n = rng.integers(2, min(H, W))
                y0, x0 = rng.integers(0, H - n + 1), rng.integers(0, W - n + 1)
                masks[b, y0 + np.arange(n), x0 + np.arange(n)] = True
            else:  # ellipse, possibly touching the border
                cy, cx = rng.integers(-2, H + 2), rng.integers(-2, W + 2)
                ry, rx = rng.uniform(1, H / 3), rng.uniform(1, W / 3)
                masks[b] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return masks


def maps_for(rng, masks, kind="smooth"):
    B, H, W = masks.shape
    noise = rng.standard_normal((B, H, W))
    if kind == "smooth":
        maps = nd.gaussian_filter(noise, (0, 1.5, 1.5)) + 0.8 * nd.gaussian_filter(masks.astype(float), (0, 1, 1))
    elif kind == "ties":  # few distinct values, many ties across classes
        maps = np.round(4 * (noise + 1.5 * masks)) / 4
    elif kind == "heavy":  # heavy right tail over many orders of magnitude
        maps = np.exp(6 * (noise + masks))
    elif kind == "constant":
        maps = np.full((B, H, W), 0.5)
    elif kind == "signed_zero":
        maps = np.where(rng.random((B, H, W)) < 0.5, -0.0, 0.0) + masks * (rng.random((B, H, W)) < 0.5)
    else:
        raise ValueError(kind)
    return maps.astype(np.float32)
