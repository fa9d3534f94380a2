"""Channel pruning of the real EfficientNet-Lite0: qsurgery against torch-pruning at equal MACs.

torch-pruning (PyPI `torch-pruning`, not a qsurgery dependency: `pip install torch-pruning`) prunes the timm
model with L1 group magnitude, once with the same ratio in every layer (its default) and once with global
ranking (`global_pruning=True`, ratio searched to the same MACs). qsurgery prunes the captured graph with
`prune_channels(target_macs=..., sensitivity=pruning_sensitivity(...))` (L1 of BN-folded filters, bias
compensation, measured on 64 of the 100 calibration images) to the MACs torch-pruning's uniform run reached.
No fine-tuning anywhere: float top-1 on the 400 held-out images, MACs counted by each tool and by qsurgery.

    python benchmarks/prune_vs_torch_pruning.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.passes import graph_cost, prune_channels, pruning_sensitivity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--sensitivity-images", type=int, default=64)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit("this comparison needs torch-pruning: pip install torch-pruning") from None
    s = load_lite0(args.data, 100, 25, eval_limit=args.eval_limit)
    graph, xe, ye = s.graph, s.xe, s.ye
    example = s.xc[:1]

    def top1(model) -> float:
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(xe[i:i + 50]) for i in range(0, len(xe), 50)])
        return 100 * (out.argmax(1) == ye).float().mean().item()

    def macs(model) -> float:
        return graph_cost(qsurgery.capture(model, example))["macs"]

    def tp_prune(ratio: float, global_pruning: bool) -> torch.nn.Module:
        model = copy.deepcopy(s.model).eval()
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=global_pruning,
                                      ignored_layers=[model.get_classifier()])
        pruner.step()
        return model

    base = graph_cost(graph)["macs"]
    print(f"{len(s.xc)} calibration / {len(xe)} evaluation images; torch-pruning {tp.__version__}; "
          f"float top-1 {top1(graph):.2f} % at {base / 1e6:.1f} M MACs", flush=True)
    t = time.perf_counter()
    measured = pruning_sensitivity(graph, s.calib, images=args.sensitivity_images, progress=False)
    print(f"qsurgery pruning_sensitivity: {time.perf_counter() - t:.0f} s (once, for every budget)", flush=True)

    print("\n| channel ratio | method | MACs (M) | MACs vs original | params (M) | float top-1 | time (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for ratio in args.ratios:
        t = time.perf_counter()
        uniform = tp_prune(ratio, False)
        t_uniform = time.perf_counter() - t
        goal = macs(uniform)
        lo, hi = 0.0, 0.9  # global ranking: search the ratio that lands on the same MACs
        t = time.perf_counter()
        for _ in range(8):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if macs(tp_prune(mid, True)) > goal else (lo, mid)
        glob = tp_prune(hi, True)
        t_global = time.perf_counter() - t
        t = time.perf_counter()
        ours = prune_channels(graph, target_macs=goal / base, calib_data=s.calib, sensitivity=measured,
                              progress=False).graph
        t_ours = time.perf_counter() - t
        for name, model, dt in ((f"torch-pruning, same ratio per layer ({ratio:.0%})", uniform, t_uniform),
                                (f"torch-pruning, global ranking (ratio {hi:.3f})", glob, t_global),
                                ("qsurgery, sensitivity allocation + compensation", ours, t_ours)):
            m = macs(model)
            params = sum(p.numel() for p in model.parameters())
            print(f"| {ratio:.0%} | {name} | {m / 1e6:.1f} | {100 * m / base:.0f} % | {params / 1e6:.2f} | "
                  f"{top1(model):.2f} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
