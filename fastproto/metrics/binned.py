"""Binned protocol: a paged histogram of the float32 bit pattern with rigorous error bounds.

Scores are binned on their monotone 32-bit key (no min/max pass). The key's top ``PREFIX_BITS`` = 12 bits
(sign, exponent and 3 mantissa bits: 8 pages per octave) select a page; a page holds ``2**bits`` bins
over the remaining 20 key bits. A page's ``bits`` is chosen when a batch first touches it: about 4 bins
per score of that batch, at most ``bins_bits - 12`` and at most the page's share (by class-balanced
count) of the bin budget ``max_bins`` less a quarter kept for pages that later batches touch; pages
beyond it are one bin. AD maps
occupy a few octaves, so the resolution goes where the scores are while memory stays fixed. Pages sit in key order, so the
histogram is already sorted; every bin is a key interval, which is what the error bounds need.

States merge by summation after both sides are brought to one layout (``_conform``: a page takes the
coarser of the two resolutions, folding bins, and pages are coarsened further if the budget is
exceeded), locally (``merge``) or across ranks (``all_reduce``).
"""
from __future__ import annotations

import math

import torch

from fastproto import _ext

PREFIX_BITS = 12
PAGES = 1 << PREFIX_BITS
LOW_BITS = 32 - PREFIX_BITS


def float_key(x: torch.Tensor) -> torch.Tensor:
    """Monotone int64 image of float32 values (uint32 range): a < b <=> key(a) < key(b); -0.0 == +0.0."""
    bits = (x.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


def histogram_update(neg_hist, pos_hist, weight_hist, page_base, page_shift, neg, pos, pos_sizes,
                     prefix_bits: int = PREFIX_BITS, *, impl: str = "auto") -> None:
    """Add normal scores, anomalous scores and their PRO weights (1/size) into a paged histogram."""
    if impl != "reference" and _ext.has_op("histogram_update", neg_hist.device.type):
        _ext.op("histogram_update")(neg_hist, pos_hist, weight_hist, page_base, page_shift, neg.contiguous(),
                                    pos.contiguous(), pos_sizes.contiguous(), prefix_bits)
        return
    low = 32 - prefix_bits

    def bins(x):
        key = float_key(x)
        page = key >> low
        return page_base[page] + ((key & ((1 << low) - 1)) >> page_shift[page])

    for part in torch.split(neg, 1 << 24):
        neg_hist += torch.bincount(bins(part), minlength=neg_hist.numel())
    pbins = bins(pos)
    pos_hist += torch.bincount(pbins, minlength=pos_hist.numel())
    weight_hist.index_add_(0, pbins, 1.0 / pos_sizes.double())


class PagedHistogram:
    """Fixed-memory histogram state of one category (see the module docstring).

    Args:
        bins_bits: finest resolution, as bits of the float32 key (26: a bin is 2**-17 of its value wide).
        max_bins: budget of bins beyond one per page; state is at most ``(4096 + max_bins) * 24`` bytes.
    """

    def __init__(self, bins_bits: int = 26, max_bins: int = 1 << 20, device=None):
        if not PREFIX_BITS <= bins_bits <= 32:
            raise ValueError(f"bins_bits must be in [{PREFIX_BITS}, 32], got {bins_bits}")
        if max_bins < 0:
            raise ValueError(f"max_bins must be >= 0, got {max_bins}")
        self.bins_bits, self.max_bins = int(bins_bits), int(max_bins)
        self.max_page_bits = self.bins_bits - PREFIX_BITS
        self.device = torch.device(device or "cpu")
        self.touched = torch.zeros(PAGES, dtype=torch.bool, device=self.device)
        self.page_bits = torch.zeros(PAGES, dtype=torch.long, device=self.device)
        self._layout()
        self.neg, self.pos, self.weight = self._zeros()

    def _layout(self) -> None:
        sizes = torch.ones(PAGES, dtype=torch.long, device=self.device) << self.page_bits
        self.page_base = torch.cumsum(sizes, 0) - sizes
        self.page_shift = LOW_BITS - self.page_bits
        self.n_bins = int(sizes.sum())

    def _zeros(self):
        return (torch.zeros(self.n_bins, dtype=torch.long, device=self.device),
                torch.zeros(self.n_bins, dtype=torch.long, device=self.device),
                torch.zeros(self.n_bins, dtype=torch.float64, device=self.device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.neg, self.pos, self.weight))

    def update(self, neg: torch.Tensor, pos: torch.Tensor, pos_sizes: torch.Tensor, *, impl: str = "auto") -> None:
        if not self._within_touched(neg, pos):
            self._touch(neg, pos, pos_sizes, impl)
        histogram_update(self.neg, self.pos, self.weight, self.page_base, self.page_shift, neg, pos, pos_sizes,
                         PREFIX_BITS, impl=impl)

    def _within_touched(self, neg: torch.Tensor, pos: torch.Tensor) -> bool:
        """True when every page between the batch's smallest and largest score is already laid out
        (then no page is new and the counting pass over pages can be skipped)."""
        lo, hi = [], []
        for x in (neg, pos):
            if x.numel():
                a, b = torch.aminmax(x)
                lo.append(a)
                hi.append(b)
        if not lo:
            return True
        pages = float_key(torch.stack([min(lo), max(hi)])) >> LOW_BITS
        first, last = int(pages[0]), int(pages[1])
        return bool(self.touched[first:last + 1].all())

    def _touch(self, neg, pos, pos_sizes, impl) -> None:
        n, p = self._page_counts(neg, pos, pos_sizes, impl)
        new = (n + p > 0) & ~self.touched
        if bool(new.any()):
            bits = self.page_bits.clone()
            bits[new] = self._allocate(n[new], p[new])
            self._conform(bits)
            self.touched |= new

    def _page_counts(self, neg, pos, pos_sizes, impl) -> torch.Tensor:
        """Scores per page: one pass into 4096 one-bin pages."""
        base = torch.arange(PAGES, device=self.device)
        shift = torch.full((PAGES,), LOW_BITS, dtype=torch.long, device=self.device)
        n = torch.zeros(PAGES, dtype=torch.long, device=self.device)
        p, w = torch.zeros_like(n), torch.zeros(PAGES, dtype=torch.float64, device=self.device)
        histogram_update(n, p, w, base, shift, neg, pos, pos_sizes, PREFIX_BITS, impl=impl)
        return n, p

    def _allocate(self, n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Bits for newly touched pages (their normal and anomalous counts ``n``, ``p`` in this batch).

        ~4 bins per score, at most ``bins_bits - 12``, and at most the page's share of the budget left (less a
        quarter kept for pages later batches touch). Shares follow class-balanced mass ``n/sum(n) + p/sum(p)``:
        the bounds come from bins holding both classes, so resolution goes where both are.
        """
        n, p = n.double(), p.double()
        mass = n / n.sum().clamp_min(1) + p / p.sum().clamp_min(1)
        left = self.max_bins - (self.n_bins - PAGES) - self.max_bins // 4
        share = torch.floor(torch.log2((left * mass / mass.sum()).clamp_min(1)))
        want = torch.minimum(torch.ceil(torch.log2(4 * (n + p))), share).long().clamp(0, self.max_page_bits)
        order = torch.argsort(mass, descending=True, stable=True)
        extra = torch.cumsum((torch.ones_like(want) << want[order]) - 1, 0)
        granted = torch.zeros_like(want)
        granted[order] = torch.where(extra <= left, want[order], 0)
        return granted

    def _conform(self, bits: torch.Tensor) -> None:
        """Re-lay the state out with per-page ``bits``; touched pages may only get coarser (bins fold)."""
        if torch.equal(bits, self.page_bits):
            return
        if bool((self.touched & (bits > self.page_bits)).any()):
            raise RuntimeError("a touched page cannot be refined")
        old_base, old_bits, old = self.page_base, self.page_bits, (self.neg, self.pos, self.weight)
        self.page_bits = bits
        self._layout()
        new = self._zeros()
        page = torch.repeat_interleave(torch.arange(PAGES, device=self.device), torch.ones_like(old_bits) << old_bits)
        offset = torch.arange(page.numel(), device=self.device) - old_base[page]
        drop = torch.clamp(old_bits[page] - bits[page], min=0)  # untouched pages hold no data
        target = self.page_base[page] + (offset >> drop)
        for src, dst in zip(old, new):
            dst.index_add_(0, target, src)
        self.neg, self.pos, self.weight = new

    def _page_mass(self) -> torch.Tensor:
        page = torch.repeat_interleave(torch.arange(PAGES, device=self.device), torch.ones_like(self.page_bits) << self.page_bits)
        return torch.zeros(PAGES, dtype=torch.long, device=self.device).index_add_(0, page, self.neg + self.pos)

    def _merged_bits(self, bits_a, touched_a, bits_b, touched_b, mass) -> torch.Tensor:
        big = self.max_page_bits + 1
        bits = torch.minimum(torch.where(touched_a, bits_a, big), torch.where(touched_b, bits_b, big))
        bits = torch.where(touched_a | touched_b, bits, 0)
        return self._fit_budget(bits, mass)

    def _fit_budget(self, bits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Coarsen the least massive pages (deterministically) until the extra bins fit the budget."""
        while int(((torch.ones_like(bits) << bits) - 1).sum()) > self.max_bins:
            refined = bits > 0
            light = torch.where(refined, mass, torch.iinfo(torch.long).max)
            bits = bits.clone()
            bits[torch.argmin(light)] -= 1
        return bits

    def _check_compatible(self, other: "PagedHistogram") -> None:
        if (self.bins_bits, self.max_bins) != (other.bins_bits, other.max_bins):
            raise ValueError(f"cannot merge histograms with bins_bits/max_bins {(self.bins_bits, self.max_bins)} "
                             f"and {(other.bins_bits, other.max_bins)}")

    def merge(self, other: "PagedHistogram") -> "PagedHistogram":
        self._check_compatible(other)
        other = other.clone().to(self.device)
        bits = self._merged_bits(self.page_bits, self.touched, other.page_bits, other.touched,
                                 self._page_mass() + other._page_mass())
        touched = self.touched | other.touched
        self._conform(bits)
        other._conform(bits)
        for mine, theirs in zip((self.neg, self.pos, self.weight), (other.neg, other.pos, other.weight)):
            mine += theirs
        self.touched = touched
        return self

    def all_reduce(self, group=None) -> "PagedHistogram":
        """Sum this state over all ranks of ``torch.distributed`` (every rank ends with the merged state)."""
        import torch.distributed as dist

        big = self.max_page_bits + 1
        bits = torch.where(self.touched, self.page_bits, big)
        touched = self.touched.to(torch.uint8)
        mass = self._page_mass()
        dist.all_reduce(bits, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(touched, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(mass, op=dist.ReduceOp.SUM, group=group)
        bits = self._fit_budget(torch.where(touched.bool(), bits, 0), mass)
        self._conform(bits)
        for t in (self.neg, self.pos, self.weight):
            dist.all_reduce(t, group=group)
        self.touched = touched.bool()
        return self

    def clone(self) -> "PagedHistogram":
        return self.to(self.device, copy=True)

    def to(self, device, copy: bool = False) -> "PagedHistogram":
        device = torch.device(device)
        if device == self.device and not copy:
            return self
        out = PagedHistogram.__new__(PagedHistogram)
        out.__dict__.update(self.__dict__)
        out.device = device
        for name in ("touched", "page_bits", "page_base", "page_shift", "neg", "pos", "weight"):
            setattr(out, name, getattr(self, name).to(device, copy=True))
        return out

    def metrics(self, n_regions: int, fpr_limit: float = 0.3) -> dict[str, float]:
        return binned_metrics(self.neg, self.pos, self.weight, n_regions, fpr_limit)


def _harmonic_gap(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_{j=1..p} 1/(a+j) = digamma(a+p+1) - digamma(a+1), float64."""
    return torch.special.digamma(a + p + 1) - torch.special.digamma(a + 1)


def binned_metrics(neg_hist, pos_hist, weight_hist, n_regions: int, fpr_limit: float = 0.3) -> dict[str, float]:
    """Estimates with rigorous error bounds from per-bin counts in ascending key order.

    Inside a bin the order of its normal and anomalous scores (and their ties) is unknown; every metric is
    bounded by the two extreme orders, bin by bin, and reported as the midpoint with half the width as
    ``<metric>_bound`` (|exact - estimate| <= bound).
    """
    nz = (neg_hist > 0) | (pos_hist > 0)
    n = neg_hist[nz].flip(0).double()
    p = pos_hist[nz].flip(0).double()
    w = weight_hist[nz].flip(0).double()
    P, N = float(p.sum()), float(n.sum())
    out = {k: math.nan for k in ("auroc", "ap", "f1max", "aupro", "auroc_bound", "ap_bound", "f1max_bound",
                                 "aupro_bound")}
    if P == 0:
        return out
    tp_after, fp_after = torch.cumsum(p, 0), torch.cumsum(n, 0)
    tpa, fpa = tp_after - p, fp_after - n  # counts above the bin
    # AP and the F1 upper bound only involve bins holding anomalous scores.
    has = p > 0
    ph, nh, tph, fph = p[has], n[has], tpa[has], fpa[has]
    # AP: lo = the bin's normal scores first and its anomalous ones distinct; hi = anomalous first, tied.
    lo = torch.sum(ph - (fph + nh) * _harmonic_gap(tph + fph + nh, ph)) / P
    hi = torch.sum(ph * (tph + ph) / (tph + ph + fph)) / P
    out["ap"], out["ap_bound"] = float(lo + hi) / 2, float(hi - lo) / 2
    # F1-max: every bin end is a point of the exact curve; inside a bin tp <= tpa + p and fp >= fpa.
    f1_lo = torch.max(2 * tp_after / (tp_after + fp_after + P))
    f1_hi = torch.maximum(torch.max(2 * (tph + ph) / (tph + ph + fph + P)), f1_lo)
    out["f1max"], out["f1max_bound"] = float(f1_lo + f1_hi) / 2, float(f1_hi - f1_lo) / 2
    if N > 0:
        below = N - fp_after  # normal scores in lower bins; a pair inside one bin counts between 0 and 1
        out["auroc"] = float(torch.sum(p * (below + 0.5 * n)) / (P * N))
        out["auroc_bound"] = float(torch.sum(p * n) / (2 * P * N))
    if n_regions > 0 and N > 0:
        x0, dx = fpa / N, n / N
        dy = w / n_regions
        y0 = torch.cumsum(dy, 0) - dy
        width = torch.clamp(torch.clamp(x0 + dx, max=fpr_limit) - x0, min=0.0)
        area_lo = torch.sum(width * y0) / fpr_limit
        area_hi = torch.sum(width * (y0 + dy)) / fpr_limit
        out["aupro"], out["aupro_bound"] = float(area_lo + area_hi) / 2, float(area_hi - area_lo) / 2
    for key in ("ap", "f1max", "auroc", "aupro"):  # margin for float64 rounding of the sums
        if not math.isnan(out[key + "_bound"]):
            out[key + "_bound"] += 1e-12
    return out
