"""Metric benchmark: fastproto's evaluator against the implementations AD codebases use.

    python bench/metrics.py [--images 150 1000] [--size 256] [--quick] [--out bench/RESULTS.md]
                            [--device cpu|cuda|all] [--json results.json]

One run, the same inputs for every method: synthetic MVTec-like maps (``fastproto.metrics.synthetic``),
each dataset plain and heavy-tailed (``exp(s/1.5)``, same ranks and ties, so every exact metric is
unchanged while binned/thresholded protocols move). For every method: median wall time of the measured
repeats (a warm-up call on 4 images is excluded; slow methods get fewer repeats, see the ``n`` column),
peak extra memory (host RSS above the pre-call level, or CUDA allocator peak for GPU rows; see
``bench/_measure.py``) in MiB and bytes per evaluated pixel, and the value of every metric it reports.

Then an exactness block: |fastproto exact - float64 reference| for the seven metrics (reference:
scikit-learn for image/pixel AUROC, AP, F1-max with image score = max of the map; the MVTec AD
official AUPRO algorithm restated with float64 FPR for AUPRO), the binned protocol's true error
against the bound it reports, and the agreement of fastproto's legacy protocols with the restated
originals. With a CUDA device (``--device cuda|all``) GPU rows are added (inputs already on the GPU,
synchronised timing) and a 113 M-pixel case (1725 images x 256^2 in 15 categories, the size of the
MVTec AD test set).

``--quick``: tiny sizes, slow baselines skipped (smoke test, < 60 s).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _measure  # noqa: E402
import baselines as B  # noqa: E402

METRICS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
HEAD = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
BATCH = 16
MVTEC_AD_TEST = (1725, 15)  # images, categories


# ------------------------------------------------------------------------------------------------
# fastproto rows
# ------------------------------------------------------------------------------------------------
def _fp():
    from fastproto import metrics as fpm

    return fpm


def _mean(out: dict) -> dict:
    """``Evaluator.compute()`` result -> metric dict (the mean over categories)."""
    if "mean" in out and isinstance(out["mean"], dict):
        return out["mean"]
    vals = [v for v in out.values() if isinstance(v, dict)]
    return vals[0] if len(vals) == 1 else out


def fp_compute_metrics(protocol="exact"):
    def run(maps, masks):
        return _fp().compute_metrics(maps, masks, protocol=protocol)

    return run


def fp_evaluator(protocol="exact", device=None, batch=BATCH, with_bounds=False):
    def run(maps, masks):
        ev = _fp().Evaluator(protocol=protocol, device=device)
        for s in range(0, len(maps), batch):
            ev.update(maps[s:s + batch], masks[s:s + batch])
        return _mean(ev.compute(with_bounds=with_bounds))

    return run


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def fmt_time(s):
    if s is None or not math.isfinite(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_val(v, digits=5):
    if v is None:
        return ""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def fmt_err(e):
    if e is None:
        return ""
    if isinstance(e, str):
        return e
    if math.isnan(e):
        return "nan"
    return "0" if e == 0 else f"{e:.1e}"


def md_table(header, rows, align=None):
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # optional package missing or broken: report, do not fail the benchmark
        return "n/a"


def environment(device_kind):
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if (device_kind != "cpu" and torch.cuda.is_available()) else None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "cpu": cpu,
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "fastproto": _version("fastproto"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "sklearn": _version("sklearn"),
        "skimage": _version("skimage"),
        "torchmetrics": _version("torchmetrics"),
    }


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        self.args = args
        self.warmed = set()
        self.budget = 2.0 if args.quick else args.budget
        self.repeats = 1 if args.quick else args.repeats

    def run(self, name, fn, maps, masks, *, cuda=False, repeats=None, note=""):
        """Measure one method; returns a row dict (never raises)."""
        row = {"name": name, "note": note, "cuda": cuda}
        try:
            if cuda:
                fn(maps, masks)  # warm-up on the full data (allocator, kernels)
                import torch

                torch.cuda.synchronize()
            elif name not in self.warmed:
                fn(maps[:4], masks[:4])  # warm-up: imports, lazy initialisation
                self.warmed.add(name)
            st = _measure.measure_stats(fn, maps, masks, repeats=repeats or self.repeats, warmup=0,
                                        cuda=cuda, budget_s=self.budget)
        except Exception as exc:  # a missing/broken method must not stop the benchmark
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            if self.args.verbose:
                traceback.print_exc()
            return row
        npx = int(np.prod(maps.shape))
        res = st["result"] or {}
        row.update(time=st["median_s"], n=len(st["times"]), peak=st["peak_bytes"],
                   bpp=st["peak_bytes"] / npx,
                   values={k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))})
        if self.args.verbose:
            print(f"  {name:55s} {fmt_time(row['time']):>10s} (n={row['n']}) "
                  f"{row['peak'] / 2**20:8.1f} MiB", flush=True)
        return row


def sklearn_sum_row(rows):
    """Derived row: what a codebase pays for all seven metrics with sklearn + the MVTec AUPRO."""
    parts = [r for r in rows if r["name"].startswith("sklearn") or r["name"].startswith("MVTec official")]
    parts = [r for r in parts if "time" in r]
    if len(parts) < 5:
        return None
    vals = {}
    for r in parts:
        vals.update(r["values"])
    return {"name": "= sklearn (6 metrics, 3 pixel sorts) + MVTec AUPRO, sum of the rows above",
            "time": sum(r["time"] for r in parts), "n": min(r["n"] for r in parts),
            "peak": max(r["peak"] for r in parts), "bpp": max(r["bpp"] for r in parts), "values": vals,
            "note": "derived"}


def bench_dataset(runner, label, maps, masks, *, run_slow, cuda):
    args = runner.args
    rows = []
    print(f"\n## {label}", flush=True)

    def add(*a, **k):
        rows.append(runner.run(*a, **k))

    if not args.gpu_only:
        # fastproto, CPU
        add("fastproto exact · compute_metrics", fp_compute_metrics("exact"), maps, masks)
        add(f"fastproto exact · Evaluator, batches of {BATCH}", fp_evaluator("exact"), maps, masks)
        add(f"fastproto binned · Evaluator, batches of {BATCH}", fp_evaluator("binned", with_bounds=True),
            maps, masks)
        for proto, what in (("dinomaly", "200 thr, skimage-style AUPRO"), ("ader", "ADEval-50 + 21-thr F1"),
                            ("adeval", "ADEval-200, as INP-Former")):
            add(f"fastproto legacy '{proto}' ({what})", fp_compute_metrics(proto), maps, masks)

        # baselines, CPU
        add("sklearn image AUROC + AP + PR→F1 (image score = max)", B.sklearn_image, maps, masks)
        add("sklearn roc_auc_score (pixel)", B.sklearn_p_auroc, maps, masks)
        add("sklearn average_precision_score (pixel)", B.sklearn_p_ap, maps, masks)
        add("sklearn precision_recall_curve → F1max (pixel)", B.sklearn_p_f1max, maps, masks)
        add("MVTec official AUPRO (restated, float64 FPR)", B.mvtec_aupro, maps, masks)
        s = sklearn_sum_row(rows)
        if s:
            rows.append(s)
        add("ADEval CPU EvalAccumulator, nstrips=50", lambda m, k: B.adeval_binned(m, k, 50), maps, masks)
        add("ADEval CPU EvalAccumulator, nstrips=200", lambda m, k: B.adeval_binned(m, k, 200), maps, masks)
        add("ADEval EvalAccumulatorCuda semantics, nstrips=50 (as ADer; GPU binning emulated in numpy)",
            lambda m, k: B.adeval_binned_cuda(m, k, 50), maps, masks)
        add("ADEval EvalAccumulatorCuda semantics, nstrips=200 (as INP-Former; GPU binning emulated in numpy)",
            lambda m, k: B.adeval_binned_cuda(m, k, 200), maps, masks)
        try:
            import adeval  # noqa: F401  (optional: the published package itself)

            for ns in (50, 200):
                add(f"ADEval package 1.1.0 (PyPI), CPU EvalAccumulator, nstrips={ns}",
                    lambda m, k, ns=ns: B.adeval_package(m, k, ns), maps, masks)
        except ImportError:
            rows.append({"name": "ADEval package (PyPI)", "skipped": "not installed (pip install adeval)"})
        add("ADer mF1_max_px (21 thresholds)", B.ader_f1max_px, maps, masks)
        if run_slow:
            add("Dinomaly compute_pro (200 thr, skimage per thr)", B.dinomaly_aupro, maps, masks, repeats=1)
        else:
            rows.append({"name": "Dinomaly compute_pro (200 thr, skimage per thr)",
                         "skipped": "skipped (slow by nature: ≈0.5 ms × images × 200 thresholds; "
                                    f"run for ≤ {args.slow_limit} images)"})
        add(f"torchmetrics BinaryAUROC + BinaryAveragePrecision (exact, batches of {BATCH}, raw maps)",
            B.torchmetrics_exact, maps, masks, note="implicit sigmoid")
        add("torchmetrics, maps min–max scaled to [0,1] first",
            lambda m, k: B.torchmetrics_exact(m, k, rescale=True), maps, masks)

    # GPU rows
    if cuda:
        import torch

        dm, dk = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()
        torch.cuda.synchronize()
        add("GPU · fastproto exact · compute_metrics", fp_compute_metrics("exact"), dm, dk, cuda=True)
        add(f"GPU · fastproto exact · Evaluator, batches of {BATCH}", fp_evaluator("exact", device="cuda"),
            dm, dk, cuda=True)
        add(f"GPU · fastproto binned · Evaluator, batches of {BATCH}",
            fp_evaluator("binned", device="cuda", with_bounds=True), dm, dk, cuda=True)
        for proto in ("dinomaly", "ader", "adeval"):
            add(f"GPU · fastproto legacy '{proto}'", fp_compute_metrics(proto), dm, dk, cuda=True)
        add("GPU · ADEval-200 EvalAccumulatorCuda (restated, torch.histc)",
            lambda m, k: B.adeval_binned_cuda(m, k, 200), dm, masks, cuda=True)
        add("GPU · torchmetrics exact, min–max scaled (host → GPU per batch)",
            lambda m, k: B.torchmetrics_exact(m, k, rescale=True, device="cuda"), maps, masks, cuda=True)
        del dm, dk
        torch.cuda.empty_cache()

    ref = reference_values(rows, maps, masks)
    return {"label": label, "shape": list(maps.shape), "rows": rows, "reference": ref}


def reference_values(rows, maps, masks):
    """float64 reference: sklearn image + pixel values and the MVTec float64 AUPRO, reusing the timed
    baseline results where they exist; plus the MVTec value with the original float32 FPR cast."""
    got = {}
    for r in rows:
        if r.get("name", "").startswith(("sklearn", "MVTec official")) and "values" in r and r.get("note") != "derived":
            got.update(r["values"])
    ref = dict(got)
    ref["reference"] = "sklearn"
    missing = [k for k in METRICS if k not in ref]
    if missing:
        full = B.reference_metrics(maps, masks)
        for k in missing:
            ref[k] = full[k]
        ref["reference"] = full["reference"]
    ref["aupro_official_float32_fpr"] = B.mvtec_aupro(maps, masks, float32_fpr=True)["aupro"]
    return ref


def big_gpu_case(args, n=MVTEC_AD_TEST[0], ncat=MVTEC_AD_TEST[1], size=None):
    """113 M pixels (MVTec AD test-set size) in 15 categories, maps already on the GPU."""
    import torch

    from fastproto.metrics.synthetic import make_maps

    size = size or args.size
    print(f"\n## GPU, {n} images × {size}² in {ncat} categories", flush=True)
    maps, masks = make_maps(n, size, seed=args.seed)
    cats = [f"cat{int(i * ncat / n):02d}" for i in range(n)]
    dm, dk = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()
    torch.cuda.synchronize()
    fpm = _fp()
    rows = []

    def full(protocol):
        def run(m, k):
            ev = fpm.Evaluator(protocol=protocol, device="cuda")
            ev.update(m, k, categories=cats)
            return _mean(ev.compute(with_bounds=protocol == "binned"))
        return run

    def batched(protocol):
        def run(m, k):
            ev = fpm.Evaluator(protocol=protocol, device="cuda")
            for s in range(0, n, BATCH):
                ev.update(m[s:s + BATCH], k[s:s + BATCH], categories=cats[s:s + BATCH])
            return _mean(ev.compute(with_bounds=protocol == "binned"))
        return run

    runner = Runner(args)
    rows.append(runner.run("GPU · exact · one update (15 categories) + compute", full("exact"), dm, dk, cuda=True))
    rows.append(runner.run(f"GPU · exact · updates of {BATCH} + compute", batched("exact"), dm, dk, cuda=True))
    try:  # compute() alone, state already accumulated
        ev = fpm.Evaluator(protocol="exact", device="cuda")
        ev.update(dm, dk, categories=cats)
        rows.append(runner.run("GPU · exact · compute() only", lambda m, k: _mean(ev.compute()), dm, dk,
                               cuda=True))
    except Exception as exc:  # report, continue
        rows.append({"name": "GPU · exact · compute() only", "error": f"{type(exc).__name__}: {exc}"[:160]})
    rows.append(runner.run("GPU · binned · one update + compute", full("binned"), dm, dk, cuda=True))
    rows.append(runner.run(f"GPU · binned · updates of {BATCH} + compute", batched("binned"), dm, dk,
                           cuda=True))
    del dm, dk
    torch.cuda.empty_cache()
    return {"label": f"GPU · {n} images × {size}² = {n * size * size / 1e6:.0f} M px, {ncat} categories",
            "shape": [n, size, size], "rows": rows, "reference": None}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def dataset_table(ds):
    header = ["method", "time", "n", "peak MiB", "B/px", *HEAD]
    out = []
    for r in ds["rows"]:
        if "skipped" in r:
            out.append([r["name"], r["skipped"], "", "", "", *[""] * 7])
        elif "error" in r:
            out.append([r["name"], "error: " + r["error"], "", "", "", *[""] * 7])
        else:
            v = r["values"]
            name = r["name"] + (f" ({r['note']})" if r.get("note") and r["note"] != "derived" else "")
            out.append([name, fmt_time(r["time"]), r["n"], f"{r['peak'] / 2**20:.1f}", f"{r['bpp']:.1f}",
                        *[fmt_val(v.get(k)) for k in METRICS]])
    return md_table(header, out)


def _row(ds, prefix):
    for r in ds["rows"]:
        if r.get("name", "").startswith(prefix) and "values" in r:
            return r
    return None


_CUDA50 = "ADEval EvalAccumulatorCuda semantics, nstrips=50"
_CUDA200 = "ADEval EvalAccumulatorCuda semantics, nstrips=200"


def exactness_table(ds):
    ref = ds["reference"]
    if not ref:
        return ""
    header = ["|Δ| vs float64 reference", *HEAD, "max"]
    lines = []
    for r in ds["rows"]:
        name = r.get("name", "")
        if "values" not in r or "exact" not in name or "fastproto" not in name:
            continue
        errs = [abs(r["values"][k] - ref[k]) if k in r["values"] else float("nan") for k in METRICS]
        if ref.get("reference", "sklearn") != "sklearn":
            name += f" (reference: {ref['reference']})"
        lines.append([name, *[fmt_err(e) for e in errs], fmt_err(max(errs))])
    off = abs(ref["aupro_official_float32_fpr"] - ref["aupro"])
    lines.append(["MVTec official as published (float32 FPR cast)", *[""] * 6, fmt_err(off), fmt_err(off)])
    for r in ds["rows"]:
        if r.get("name", "").startswith("torchmetrics") and "values" in r:
            errs = [abs(r["values"][k] - ref[k]) if k in r["values"] else None for k in METRICS]
            lines.append([r["name"], *[fmt_err(e) for e in errs], fmt_err(max(e for e in errs if e is not None))])
    text = md_table(header, lines)

    # binned: true error vs reported bound
    brows = []
    for r in ds["rows"]:
        if "binned" in r.get("name", "") and "values" in r:
            cells, ok = [], True
            for k in METRICS:
                if k not in r["values"]:
                    cells.append("")
                    continue
                err = abs(r["values"][k] - ref[k])
                bound = r["values"].get(k + "_bound")
                if bound is None:
                    cells.append(f"{fmt_err(err)} (no bound)")
                else:
                    good = err <= bound + 1e-12  # slack: float64 rounding of the two values being compared
                    ok &= good
                    cells.append(f"{fmt_err(err)} ≤ {fmt_err(bound)}" if good
                                 else f"**{fmt_err(err)} > {fmt_err(bound)}**")
            brows.append([r["name"], *cells, "✓" if ok else "✗"])
    if brows:
        text += "\n\nBinned protocol: true error ≤ reported bound\n\n" + md_table(
            ["binned", *HEAD, "all within"], brows)

    # legacy protocols vs restated originals
    pairs = [
        ("dinomaly", {"aupro": "Dinomaly compute_pro", "p_auroc": "sklearn roc_auc", "p_ap": "sklearn average",
                      "p_f1max": "sklearn precision", "i_auroc": "sklearn image"}),
        ("ader", {"p_auroc": _CUDA50, "p_ap": _CUDA50, "aupro": _CUDA50, "p_f1max": "ADer mF1",
                  "i_auroc": "sklearn image"}),
        ("adeval", {"p_auroc": _CUDA200, "p_ap": _CUDA200, "aupro": _CUDA200, "p_f1max": "sklearn precision",
                    "i_auroc": "sklearn image"}),
    ]
    lrows = []
    for proto, srcs in pairs:
        for dev in ("", "GPU · "):
            fr = _row(ds, f"{dev}fastproto legacy '{proto}'")
            if fr is None:
                continue
            cells = []
            for k in METRICS:
                src = srcs.get(k) or (srcs.get("i_auroc") if k.startswith("i_") else None)
                br = _row(ds, src) if src else None
                if br is None or k not in br["values"] or k not in fr["values"]:
                    cells.append("n/a" if k in ("aupro",) and src else "")
                    continue
                cells.append(fmt_err(abs(fr["values"][k] - br["values"][k])))
            lrows.append([f"{dev}fastproto '{proto}' vs restated original", *cells])
    if lrows:
        text += ("\n\nLegacy protocols: |fastproto − restated original| (Dinomaly: its compute_pro + sklearn; "
                 "ader: ADEval EvalAccumulatorCuda-50 + ADer 21-threshold F1; adeval: EvalAccumulatorCuda-200 + "
                 "sklearn F1; image metrics: sklearn; n/a: original not run on this dataset)\n\n"
                 + md_table(["protocol", *HEAD], lrows))
    return text


def summary_table(datasets):
    labels = [d["label"] for d in datasets]
    names = []
    for d in datasets:
        for r in d["rows"]:
            if r["name"] not in names:
                names.append(r["name"])
    rows = []
    for nm in names:
        cells = []
        for d in datasets:
            r = next((x for x in d["rows"] if x["name"] == nm), None)
            cells.append("" if r is None else ("skipped" if "skipped" in r else
                                               ("error" if "error" in r else fmt_time(r["time"]))))
        rows.append([nm, *cells])
    return md_table(["method \\ time", *labels], rows)


def render(env, datasets, args, mem_check):
    dev = env["gpu"] or "CPU only"
    lines = [
        f"Device: {dev}; CPU: {env['cpu']} ({env['cpu_cores']} cores available, torch threads "
        f"{env['torch_threads']}); date {env['date']}.",
        f"Versions: fastproto {env['fastproto']}, torch {env['torch']}, numpy {env['numpy']}, scipy "
        f"{env['scipy']}, scikit-learn {env['sklearn']}, scikit-image {env['skimage']}, torchmetrics "
        f"{env['torchmetrics']}, Python {env['python']}.",
        f"Command: `python bench/metrics.py {' '.join(sys.argv[1:])}`; load average (1 min) at start / "
        f"end: {env['load_start']:.2f} / {env.get('load_end', float('nan')):.2f} (other jobs on the machine "
        "make timings noisy).",
        f"Timing: median of up to {args.repeats if not args.quick else 1} measured runs (stopping after "
        f"{args.budget if not args.quick else 2.0:g} s of measured time; `n` = runs), after a warm-up call on "
        f"4 images (GPU rows: on the full data), excluded. Memory: peak extra host RSS during the call "
        f"(method `{mem_check['method']}`; check with known allocations: numpy {mem_check['numpy_MiB']} MiB, "
        f"torch {mem_check['torch_MiB']} MiB for {mem_check['expected_MiB']} MiB → "
        f"{'ok' if mem_check['ok'] else 'NOT OK'}); GPU rows: CUDA allocator peak above the pre-call level. "
        "B/px = peak / evaluated pixels.",
        "Data: `fastproto.metrics.synthetic.make_maps` (seed "
        f"{args.seed}); heavy-tailed = exp(s/1.5) of the same maps (same ranks and ties: exact metrics "
        "must not change). Image score = max of the map, image label = any GT pixel. ADEval \"P-AP\" is "
        "its trapezoidal AUPR.",
        "",
        "### Time summary",
        "",
        summary_table(datasets),
    ]
    for d in datasets:
        lines += ["", f"### {d['label']}", "", dataset_table(d)]
        ex = exactness_table(d)
        if ex:
            lines += ["", "Exactness (float64 reference: sklearn for image/pixel AUROC/AP/F1-max, MVTec "
                      "official algorithm with float64 FPR for AUPRO)", "", ex]
    return "\n".join(lines)


def write_section(path, key, title, body):
    """Write or replace the section between markers for ``key`` in ``path``."""
    start, end = f"<!-- bench/metrics.py:{key}:start -->", f"<!-- bench/metrics.py:{key}:end -->"
    block = f"{start}\n## {title}\n\n{body}\n{end}\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[150, 1000])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, slow baselines skipped (smoke test)")
    ap.add_argument("--out", default=None, help="write/update a section of this Markdown file")
    ap.add_argument("--json", default=None, help="also dump all numbers as JSON")
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu",
                    help="cpu: CPU rows only; cuda/all: add GPU rows and the 113 M-pixel case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0, help="stop repeating after this many measured seconds")
    ap.add_argument("--slow-limit", type=int, default=200,
                    help="run the skimage 200-threshold AUPRO only on datasets with at most this many images")
    ap.add_argument("--no-heavy", action="store_true", help="skip the heavy-tailed variants")
    ap.add_argument("--gpu-only", action="store_true",
                    help="with --device cuda: only the GPU rows (the float64 reference is still computed on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from fastproto.metrics.synthetic import heavy_tail_transform, make_maps

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.size = [12], 64
    cuda = args.device in ("cuda", "all")
    if cuda and not torch.cuda.is_available():
        print("warning: --device cuda requested but no CUDA device is available; CPU rows only", file=sys.stderr)
        cuda = False
    # --device cuda and all both keep the CPU rows: the comparison needs the CPU baselines on the same data
    env = environment("cuda" if cuda else "cpu")
    mem_check = _measure.validate(64 if args.quick else 400)
    print(f"memory measurement: {mem_check}", flush=True)
    runner = Runner(args)
    datasets = []
    t0 = time.perf_counter()
    for n in args.images:
        maps, masks = make_maps(n, args.size, seed=args.seed)
        variants = [("plain", maps)]
        if not args.no_heavy:
            variants.append(("heavy-tailed", None))
        for kind, m in variants:
            if m is None:
                m = heavy_tail_transform(maps)
            label = f"{n} images × {args.size}² ({n * args.size**2 / 1e6:.1f} M px), {kind}"
            run_slow = (not args.quick) and n <= args.slow_limit
            datasets.append(bench_dataset(runner, label, m, masks, run_slow=run_slow, cuda=cuda))
            del m
        del maps, masks
    if cuda:  # the MVTec-AD-sized multi-category case (quick: a small stand-in that exercises the code)
        datasets.append(big_gpu_case(args, 120, 4, 64) if args.quick else big_gpu_case(args))

    env["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    body = render(env, datasets, args, mem_check)
    print("\n" + body)
    print(f"\n(total benchmark time {time.perf_counter() - t0:.0f} s)")
    if args.out:
        key = "quick" if args.quick else ("cuda" if cuda else "cpu")
        title = ("Metrics benchmark" + (" (quick smoke run)" if args.quick else "") +
                 f" — {env['gpu'] or 'CPU'}, {env['cpu_cores']} CPU cores, {env['date']}")
        write_section(args.out, key, title, body)
        print(f"wrote section '{key}' of {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "memory_check": mem_check, "datasets": datasets}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
