"""Where a model's inference time goes: the top GPU kernels (torch.profiler) of one forward pass.

    python bench/profile_model.py --model inpformer --batch 64 [--reference] [--top 15]

Random weights (``pretrained=False``), DINOv2 ViT-B/14 with registers at 392 px, bf16 autocast, after two
warm-up passes. Prints the kernel table and the share of the total GPU time taken by each op family
(attention, matmul, normalisation, element-wise, ...), which bounds what fusing one op can gain.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastproto import models  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="inpformer")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backbone", default="dinov2_vitb14_reg")
    ap.add_argument("--image-size", type=int, default=392)
    ap.add_argument("--reference", action="store_true", help="run the model on the reference ops")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_model.py needs a CUDA device")
    kw = {"image_size": args.image_size} if args.model == "proad" else {}
    model = models.create(args.model, backbone=args.backbone, pretrained=False, reference=args.reference, **kw)
    model = model.cuda().eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            model(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"{args.model} ({'reference' if args.reference else 'fused'} ops), batch {args.batch}, bf16: "
          f"{total / 1e3:.2f} ms of GPU kernel time")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
        print(f"{e.device_time_total / 1e3:8.3f} ms {100 * e.device_time_total / total:5.1f}%  x{e.count:<4d} {e.key[:110]}")


if __name__ == "__main__":
    main()
