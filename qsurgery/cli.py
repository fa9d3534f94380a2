"""Command line: ``qsurgery quantize`` (simulate int8, compare with float), ``qsurgery analyze`` (which layers
break and why: report), ``qsurgery export`` (float and QDQ ONNX)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .capture import capture
from .data import ImageFolder, distill_images, loader, model_transform, sample_images, split
from .errors import QSurgeryError
from .evaluate import agreement, predict, top1
from .models import create_model
from .quant import QuantConfig, quantize
from .quant.config import OBSERVERS


def _config(args: argparse.Namespace) -> QuantConfig:
    if args.target == "pow2-int8":
        cfg = QuantConfig.pow2_int8(observer=args.observer)
    elif args.target == "full-int8":
        cfg = QuantConfig.full_int8(observer=args.observer)
    else:
        cfg = QuantConfig.int8(per_channel=not args.per_tensor, observer=args.observer)
    for name in args.keep_float:
        cfg = cfg.override(name, dtype="float")
    return cfg


def _prepare(args: argparse.Namespace):
    """Model, calibration/evaluation sets, their description, the captured graph and the config."""
    torch.manual_seed(0)
    model = create_model(args.model, checkpoint=args.checkpoint)
    transform = model_transform(model, input_size=args.input_size)
    if args.data:
        dataset = ImageFolder(args.data, transform)
        n_eval = args.eval if args.eval > 0 else None
        calib_set, eval_set = split(dataset, min(args.calib, len(dataset) - 1), n_eval)
        source = f"{args.data} ({len(calib_set)} calibration / {len(eval_set)} evaluation images, disjoint)"
    elif getattr(args, "distill", False) and _has_batchnorm(model):
        cfg = resolve_input_size(model, args.input_size)
        n_eval = args.eval if args.eval > 0 else 64
        progress = not args.quiet
        xs = distill_images(model, args.calib + n_eval, size=cfg, steps=args.distill_steps, seed=0,
                            cache_dir=args.cache_dir, progress=progress)
        no_label = torch.full((len(xs),), -1)
        calib_set = torch.utils.data.TensorDataset(xs[:args.calib], no_label[:args.calib])
        eval_set = torch.utils.data.TensorDataset(xs[args.calib:], no_label[args.calib:])
        source = (f"distilled from the model's BatchNorm statistics (no --data; {len(calib_set)} calibration / "
                  f"{len(eval_set)} separate evaluation images, {args.distill_steps} steps, cached)")
    else:
        calib_set = sample_images(args.calib, transform, seed=1)
        eval_set = sample_images(args.eval if args.eval > 0 else 64, transform, seed=2)
        source = (f"built-in sample photos (random crops; {len(calib_set)} calibration / {len(eval_set)} "
                  "evaluation, unlabeled)")
    example = calib_set[0][0].unsqueeze(0)
    graph = capture(model, example)
    return model, calib_set, eval_set, source, graph, _config(args)


def _has_batchnorm(model: torch.nn.Module) -> bool:
    from .graph import BATCHNORM_MODULES

    return any(isinstance(m, BATCHNORM_MODULES) for m in model.modules())


def resolve_input_size(model: torch.nn.Module, input_size: int | None) -> int:
    """The square input size: the one given, else the model's timm pretrained config, else 224."""
    if input_size:
        return input_size
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _cmd_quantize(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, calib_set, eval_set, source, graph, config = _prepare(args)
    sim, plan = quantize(graph, loader(calib_set, args.batch_size), config, progress=not args.quiet)
    t_float = time.perf_counter()
    float_out, labels = predict(graph, loader(eval_set, args.batch_size), progress=not args.quiet, desc="float")
    t_sim = time.perf_counter()
    quant_out, _ = predict(sim, loader(eval_set, args.batch_size), progress=not args.quiet, desc="int8 simulated")
    t_end = time.perf_counter()

    print(f"model        {args.model}  ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
    print(f"images       {source}")
    print(f"quantization {config.describe()}; {len(plan)} quantized ops, {len(plan.non_int8())} not int8")
    if labels is not None:
        print(f"top-1        float {100 * top1(float_out, labels):.2f} %   int8 {100 * top1(quant_out, labels):.2f} %")
    print(f"agreement    int8 top-1 = float top-1 on {100 * agreement(float_out, quant_out):.2f} % of "
          f"{len(float_out)} images")
    print(f"time         {t_end - t0:.1f} s total; float {len(float_out) / (t_sim - t_float):.1f} img/s, "
          f"simulated {len(float_out) / (t_end - t_sim):.1f} img/s")
    if args.plan:
        plan.to_json(args.plan)
        print(f"plan         written to {args.plan}")
    if args.verbose:
        print()
        print(plan.summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model, calib_set, eval_set, _source, graph, config = _prepare(args)
    args.out.mkdir(parents=True, exist_ok=True)
    example = calib_set[0][0].unsqueeze(0)
    verify = [b[0] for b in loader(eval_set, args.batch_size)]
    stem = args.model.replace(":", "_").replace("/", "_")
    report = export_onnx(graph, args.out / f"{stem}_float.onnx", example, opset=args.opset, verify_inputs=verify)
    print(report.summary())
    if not args.float_only:
        sim, plan = quantize(graph, loader(calib_set, args.batch_size), config, progress=not args.quiet)
        report = export_onnx(sim, args.out / f"{stem}_int8_qdq.onnx", example, opset=args.opset,
                             verify_inputs=verify, calib_ranges_json=args.out / f"{stem}_ranges.json",
                             uint8_weights=args.uint8_weights)
        plan.to_json(args.out / f"{stem}_plan.json")
        print(report.summary())
        print(f"ranges {report.ranges_path}; plan {args.out / f'{stem}_plan.json'}")
    return 0


def _depthwise(graph) -> set[str]:
    from torch import nn

    return {name for name, m in graph.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import compare_layers, prediction_flips, sensitivity
    from .analysis.report import write_report

    t0 = time.perf_counter()
    model, calib_set, eval_set, source, graph, config = _prepare(args)
    progress = not args.quiet
    sim, plan = quantize(graph, loader(calib_set, args.batch_size), config, progress=progress)
    evaluation = loader(eval_set, args.batch_size)
    float_out, labels = predict(graph, evaluation, progress=progress, desc="float")
    quant_out, _ = predict(sim, evaluation, progress=progress, desc="int8 simulated")
    flips = prediction_flips(float_out, quant_out, labels)
    metric = args.metric
    if metric == "top1" and labels is None:
        raise QSurgeryError("--metric top1 needs labeled images (--data with labels)")
    n_sens = min(args.sens_images, len(eval_set))
    sens_set = torch.utils.data.Subset(eval_set, list(range(n_sens)))
    sens_loader = loader(sens_set, args.batch_size)
    q1 = sensitivity(graph, None, sens_loader, metric=metric, mode="quantize_one", simulated=sim, progress=progress)
    f1 = sensitivity(graph, None, sens_loader, metric=metric, mode="float_one", simulated=sim, progress=progress)
    first_batch = next(iter(loader(eval_set, min(args.batch_size, 16))))[0]
    layers = compare_layers(graph, sim, first_batch)
    facts = [("model", args.model), ("images", source), ("quantization", config.describe()),
             ("quantized ops", f"{len(plan)} ({len(plan.non_int8())} not int8)"),
             ("agreement with float", f"{100 * flips.agreement:.2f} % of {flips.total} images")]
    if labels is not None:
        facts.append(("top-1", f"float {100 * flips.float_accuracy:.2f} %, int8 {100 * flips.quant_accuracy:.2f} %"))
    facts.append(("sensitivity", f"{metric} on {n_sens} evaluation images, both modes"))
    notes = [] if labels is not None else [
        "No labels: quality is measured as agreement with the float model, not accuracy."]
    if args.data:
        from .calibration import calibration_coverage

        coverage = calibration_coverage(graph, loader(calib_set, args.batch_size), evaluation, config=config,
                                        progress=progress)
        facts.append(("calibration", coverage.message))
        print(f"calibration: {coverage.message}")
    elif source.startswith("distilled"):
        notes.append("No --data: calibrated on images distilled from the model's BatchNorm statistics and "
                     "evaluated by agreement with float on a separate distilled set. Give your own images for "
                     "numbers that mean something for your deployment.")
    else:
        notes.append("No --data: calibrated and evaluated on crops of built-in sample photos; give your own "
                     "images for numbers that mean something for your deployment.")
    path = write_report(args.out, title=f"qsurgery analysis: {args.model}", facts=facts, plan=plan, flips=flips,
                        quantize_one=q1, float_one=f1, layers=layers, depthwise=_depthwise(graph), notes=notes)
    print(f"{flips.summary()}")
    print("worst layers alone: " + ", ".join(f"{r.layer} ({r.delta:.3g})" for r in q1.top(5)))
    print(f"report: {path} (and report.html) in {time.perf_counter() - t0:.0f} s")
    return 0


def _add_common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", default="efficientnet_lite0",
                   help="built-in name (efficientnet_lite0: real ImageNet weights), a timm name, or module:factory")
    q.add_argument("--checkpoint", type=Path, help="state_dict file to load into the model")
    q.add_argument("--data", type=Path, help="image folder (class sub-folders, or flat with labels.csv); "
                                             "default: built-in sample photos")
    q.add_argument("--calib", type=int, default=32, help="calibration images (default 32)")
    q.add_argument("--eval", type=int, default=0, help="evaluation images (default: the rest, or 64 built-in)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--input-size", type=int, help="square input size (default: the model's)")
    q.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    q.add_argument("--target", choices=("int8", "full-int8", "pow2-int8"), default="int8")
    q.add_argument("--keep-float", action="append", default=[], metavar="LAYER",
                   help="keep this layer (name or glob) float; repeatable")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsurgery", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="simulate int8 on a model and compare it with float")
    _add_common(q)
    q.add_argument("--plan", type=Path, help="write the QuantPlan as JSON here")
    q.add_argument("-v", "--verbose", action="store_true", help="print the plan table")
    q.set_defaults(func=_cmd_quantize)
    a = sub.add_parser("analyze", help="find the layers int8 breaks and why; writes report.md/.html with plots")
    _add_common(a)
    a.add_argument("--out", type=Path, required=True, help="report folder")
    a.add_argument("--metric", choices=("kl", "agreement", "top1", "sqnr"), default="kl",
                   help="sensitivity metric (default kl: label-free and finer than top-1 on small sets)")
    a.add_argument("--sens-images", type=int, default=64, help="evaluation images used for sensitivity")
    a.add_argument("--no-distill", dest="distill", action="store_false",
                   help="without --data, use crops of built-in photos instead of images distilled from the model")
    a.add_argument("--distill-steps", type=int, default=40, help="optimisation steps per distilled batch")
    a.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "qsurgery",
                   help="where distilled images are cached (default ~/.cache/qsurgery)")
    a.set_defaults(func=_cmd_analyze)
    e = sub.add_parser("export", help="write float and QDQ ONNX, verified in onnxruntime")
    _add_common(e)
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--float-only", action="store_true", help="only the float ONNX")
    e.add_argument("--uint8-weights", action="store_true",
                   help="store int8 weights as uint8 + zero point 128 (same values): exact integer kernels in "
                        "onnxruntime on x86 CPUs without VNNI; not for compilers that want zero-point-0 weights")
    e.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QSurgeryError as exc:
        print(f"qsurgery: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
