"""Command line: ``qsurgery repair`` (the cheapest quantized model within an accuracy budget on a device,
with its record and verified ONNX), ``qsurgery quantize`` (simulate int8, compare with float),
``qsurgery analyze`` (which layers break and why: report), ``qsurgery export`` (float and QDQ ONNX)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import QSurgeryError
from .quant.config import OBSERVERS

if TYPE_CHECKING:  # the commands import torch and the rest when they run, so that --help is instant
    import torch

    from .quant import QuantConfig


def _config(args: argparse.Namespace) -> QuantConfig:
    from dataclasses import replace

    from .quant import QuantConfig
    from .targets import get_target

    if args.target == "int8":  # the name this option had before targets were shared with the Python API
        cfg = QuantConfig.int8(per_channel=not args.per_tensor, observer=args.observer)
    else:
        cfg = get_target(args.target).config(observer=args.observer)
        if args.per_tensor:
            cfg = replace(cfg, weight=replace(cfg.weight, per_channel=False))
    for name in args.keep_float:
        cfg = cfg.override(name, dtype="float")
    return cfg


def _prepare(args: argparse.Namespace):
    """Model, calibration/evaluation sets, their description, the captured graph and the config."""
    import torch

    from .capture import capture
    from .data import ImageFolder, distill_images, model_transform, sample_images, split
    from .models import create_model

    seed = getattr(args, "seed", 0)
    torch.manual_seed(seed)
    model = create_model(args.model, checkpoint=args.checkpoint).to(args.device)
    transform = model_transform(model, input_size=args.input_size)
    if args.data:
        dataset = ImageFolder(args.data, transform)
        if args.calib >= len(dataset):
            raise QSurgeryError(f"--calib {args.calib}: {args.data} holds {len(dataset)} images, and some must be "
                                f"left for evaluation (try --calib {max(1, min(64, len(dataset) // 4))})")
        n_eval = args.eval if args.eval > 0 else None
        calib_set, eval_set = split(dataset, min(args.calib, len(dataset) - 1), n_eval)
        source = f"{args.data} ({len(calib_set)} calibration / {len(eval_set)} evaluation images, disjoint)"
    elif getattr(args, "distill", False) and _has_batchnorm(model):
        cfg = resolve_input_size(model, args.input_size)
        n_eval = args.eval if args.eval > 0 else 64
        progress = not args.quiet
        xs = distill_images(model, args.calib + n_eval, size=cfg, steps=args.distill_steps, seed=seed,
                            cache_dir=args.cache_dir, progress=progress)
        no_label = torch.full((len(xs),), -1)
        calib_set = torch.utils.data.TensorDataset(xs[:args.calib], no_label[:args.calib])
        eval_set = torch.utils.data.TensorDataset(xs[args.calib:], no_label[args.calib:])
        source = (f"distilled from the model's BatchNorm statistics (no --data; {len(calib_set)} calibration / "
                  f"{len(eval_set)} separate evaluation images, {args.distill_steps} steps, cached)")
        print(f"warning: calibrating on {len(calib_set)} distilled images. {_DISTILLED_TRUST}", file=sys.stderr)
    else:
        calib_set = sample_images(args.calib, transform, seed=1 + 2 * seed)
        eval_set = sample_images(args.eval if args.eval > 0 else 64, transform, seed=2 + 2 * seed)
        source = (f"built-in sample photos (random crops; {len(calib_set)} calibration / {len(eval_set)} "
                  "evaluation, unlabeled)")
    example = calib_set[0][0].unsqueeze(0).to(args.device)
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
    from .data import loader
    from .evaluate import agreement, predict, top1
    from .quant import quantize

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
    from .data import loader
    from .export import export_onnx
    from .quant import quantize

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


class _Inputs:
    """The model inputs of a dataset of ``(image, label)`` pairs, by position (the report's thumbnails)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int):
        return self.dataset[i][0]


# measured by benchmarks/data_free.py (real EfficientNet-Lite0, 372 ImageNet photos the calibration never saw)
_DISTILLED_TRUST = (
    "Data-free calibration is a rough guide: on the real EfficientNet-Lite0, int8 calibrated on 64 distilled "
    "images lost 4.8 and 6.5 points of top-1 on 372 unseen photos (two seeds) where 64 real photos lost 0.8, and "
    "on 128 distilled images 2.2 and 1.9 where 128 real photos lost 0.5. The cause is the last layer: distilled "
    "images give logits up to 8.6 where photos give 15.3, so the classifier's calibrated range clips the top "
    "logits; with the classifier kept float, 64 distilled images lost 0.5 and 1.1. Use --keep-float with your "
    "classifier where the device allows it, more distilled images (--calib 128), or real images where you have "
    "them.")


def _class_names(dataset, n_outputs: int) -> tuple[list[str] | None, str | None]:
    """Names for the model's class indices, and a note saying where they come from when the images did not give
    them: the image folder's class sub-folders when they number the model's outputs, ImageNet-1k's for a
    1000-class model on images that name no classes (torchvision ships them)."""
    classes = getattr(getattr(dataset, "dataset", dataset), "classes", None)  # through a Subset
    if classes:  # the folders name the labels; they name the outputs only when they number them
        return (list(classes) if len(classes) == n_outputs else None), None
    if n_outputs == 1000:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES), "Class names: ImageNet-1k's (the model has 1000 outputs and the images " \
                                           "name none)."
    return None, None


def _cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis import compare_layers, prediction_flips, sensitivity
    from .analysis.report import write_report
    from .data import loader
    from .evaluate import predict
    from .quant import quantize

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
    args.out.mkdir(parents=True, exist_ok=True)
    q1, f1 = (sensitivity(graph, None, sens_loader, metric=metric, mode=mode, simulated=sim, progress=progress,
                          executor=args.executor, checkpoint=args.out / f"sensitivity_{mode}.ckpt")
              for mode in ("quantize_one", "float_one"))
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
                     "evaluated by agreement with float on a separate distilled set. " + _DISTILLED_TRUST)
    else:
        notes.append("No --data: calibrated and evaluated on crops of built-in sample photos; give your own "
                     "images for numbers that mean something for your deployment.")
    notes.append("The suggested fixes below are what the measurements point to, not measured fixes: `qsurgery repair` "
                 "(same --model/--data, plus --target for your device and --budget) tries them on selection images "
                 "and reports the result on images it never chose with.")
    worst = q1.top(1)
    verdict = (f"Verdict: {config.name} keeps {100 * flips.agreement:.2f} % of float's top-1 "
               f"predictions on {flips.total} images (1 image = {100 / flips.total:.2f} points)"
               + (f", top-1 {100 * flips.float_accuracy:.2f} % -> {100 * flips.quant_accuracy:.2f} %"
                  if labels is not None else "")
               + (f"; the layer that loses most alone: {worst[0].layer}" if worst and worst[0].delta > 0 else "")
               + ". `qsurgery repair` measures the fixes.")
    names, where = _class_names(eval_set, float_out.shape[-1])
    notes += [where] if where else []
    path = write_report(args.out, title=f"qsurgery analysis: {args.model}", facts=facts, plan=plan, flips=flips,
                        quantize_one=q1, float_one=f1, layers=layers, depthwise=_depthwise(graph), notes=notes,
                        images=_Inputs(eval_set), verdict=verdict, class_names=names)
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
    q.add_argument("--seed", type=int, default=0, help="seed of distilled images, built-in crops and (repair) the "
                   "selection/report split (default 0)")
    q.add_argument("--eval", type=int, default=0, help="evaluation images (default: the rest, or 64 built-in)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--input-size", type=int, help="square input size (default: the model's)")
    q.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    q.add_argument("--target", choices=_target_names() + ["int8"], default="int8",
                   help="device target (see qsurgery.TARGETS); int8: generic int8 without float layers")
    q.add_argument("--keep-float", action="append", default=[], metavar="LAYER",
                   help="keep this layer (name or glob) float; repeatable")
    q.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N or mps; "
                   "the ONNX export and its verification run on the CPU")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


def _target_names() -> list[str]:
    from .targets import TARGETS

    return sorted(TARGETS)


def _cmd_repair(args: argparse.Namespace) -> int:
    import torch

    from .data import loader
    from .repair import REMEDIES, Budget, RepairError, repair
    from .targets import get_target

    # cheap checks first: nothing expensive runs before every argument is known to be usable
    if args.out.exists() and not args.out.is_dir():
        raise RepairError(f"--out {args.out} exists and is not a folder")
    if args.data is not None and not args.data.exists():
        raise RepairError(f"--data {args.data} does not exist")
    if args.calib < 1 or args.eval < 0 or args.batch_size < 1:
        raise RepairError("--calib and --batch-size must be >= 1, --eval >= 0")
    unknown = [r for r in args.remedy if r not in REMEDIES]
    if unknown:
        raise RepairError(f"unknown --remedy {unknown[0]!r}; known: {', '.join(sorted(REMEDIES))}")
    if args.task == "detect":
        return _repair_detector(args)
    metric = args.metric or ("top1" if args.data else "agreement")
    budget = Budget(args.budget, metric, args.max_cost)
    target = get_target(args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval == 0 and not args.data:
        args.eval = 96
    t0 = time.perf_counter()
    model, calib_set, eval_set, source, graph, _config = _prepare(args)
    progress = not args.quiet
    print(f"model    {args.model}\nimages   {source}\ntarget   {target.name}: {target.description}\n"
          f"budget   at most {budget.max_drop} point(s) of {metric} below float"
          + (f", cost at most x{budget.max_cost}" if budget.max_cost else ""), flush=True)
    result = repair(graph, loader(calib_set, args.batch_size), eval_set, budget=budget, target=target,
                    remedies=args.remedy or None, selection=args.selection, max_trials=args.max_trials,
                    out_dir=args.out, seed=args.seed, batch_size=args.batch_size, executor=args.executor,
                    progress=progress)
    verify = [b[0] for b in loader(torch.utils.data.Subset(eval_set, list(range(min(16, len(eval_set))))),
                                   args.batch_size)]
    return _finish(args, result, calib_set[0][0].unsqueeze(0), verify, t0)


def _finish(args: argparse.Namespace, result, example: torch.Tensor, verify: list, t0: float) -> int:
    """Write the report, print the headline, export the verified ONNX; exit 0 when the budget holds."""
    report = args.out / "report.md"
    report.write_text(result.to_markdown())
    plot = result.plot(args.out / "repair.png")
    _write_html(args.out / "report.html", result.to_markdown(), plot.name)
    for step in result.steps:
        print(f"kept     {step['remedy']} {step['params'] or ''}")
    for w in result.warnings:
        print(f"warning  {w}")
    print(f"result   {result.headline()}")
    if args.export:
        rep = result.export_onnx(args.out / "repaired_qdq.onnx", example, verify_inputs=verify,
                                 uint8_weights=args.uint8_weights)
        steps = "n/a" if rep.max_error_steps is None else f"{rep.max_error_steps:.2f} output step(s)"
        agree = "" if rep.top1_agreement is None else f", top-1 agreement {100 * rep.top1_agreement:.2f} %"
        print(f"onnx     {rep.path}: " + (f"{rep.verdict} (" if rep.verdict else "") + "its Q/DQ arithmetic "
              f"matches the simulation to {steps}{agree} on {rep.verified_on} inputs" + (")" if rep.verdict else ""))
        for line in rep.differences:
            print(f"note     {line}")
        if result.merge_outputs is not None:
            print(f"note     the file's outputs are the split head groups {result.output_names}; "
                  "RepairResult.merge_outputs (saved in result/merge.pt) joins them on the host")
    print(f"report   {report} (and report.html, the trial log trials.jsonl, the model in result/) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if result.reached else 1


def _coco_folder(data: Path) -> Path:
    """The image folder of a COCO-style folder (``annotations/*.json`` beside one image folder), or ``data``
    itself when it holds the images."""
    if (data / "annotations").is_dir():
        folders = [d for d in sorted(data.iterdir()) if d.is_dir() and d.name != "annotations"]
        if len(folders) != 1:
            raise QSurgeryError(f"--data {data}: expected one image folder beside annotations/, found "
                                f"{[d.name for d in folders]}")
        return folders[0]
    if (data.parent / "annotations").is_dir():
        return data
    raise QSurgeryError(f"--data {data} is not a COCO-style folder: it needs annotations/*.json (COCO boxes) "
                        "beside one image folder")


def _repair_detector(args: argparse.Namespace) -> int:
    """``repair --task detect``: a detector from ``--model module:factory`` (returning an object with
    ``model``, ``decode``, ``size`` and optionally ``stretch``), repaired to an mAP budget on COCO images."""
    import importlib

    from .detection import CocoImages, DetectionMetric
    from .repair import Budget, RepairError, repair
    from .targets import get_target

    if args.data is None:
        raise RepairError("--task detect needs --data: a COCO-style folder (images + annotations/*.json)")
    if ":" not in args.model:
        raise RepairError("--task detect needs --model module:factory, a function returning the detector with "
                          "its decode (attributes model, decode, size, stretch)")
    data = CocoImages(_coco_folder(args.data))
    if args.calib >= len(data) - 1:
        raise RepairError(f"--calib {args.calib} leaves too few of the {len(data)} images for selection and report")
    target = get_target(args.target)
    module_name, _, factory = args.model.partition(":")
    try:
        spec = getattr(importlib.import_module(module_name), factory)()
    except (ImportError, AttributeError) as exc:
        raise RepairError(f"cannot load --model {args.model}: {exc}") from exc
    missing = [a for a in ("model", "decode", "size") if not hasattr(spec, a)]
    if missing:
        raise RepairError(f"--model {args.model} returned a {type(spec).__name__} without {missing}: --task detect "
                          "needs an object with model, decode, size (and stretch for a plain resize)")
    metric = DetectionMetric(data, spec.decode, size=spec.size, stretch=getattr(spec, "stretch", False))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"model    {args.model}\nimages   {data.root} ({len(data)} images with boxes; {args.calib} calibrate, "
          f"the rest select and report)\ntarget   {target.name}: {target.description}\n"
          f"budget   at most {args.budget} point(s) of {metric.__name__} below float", flush=True)
    x, positions = metric.images(args.batch_size)
    calib = [x[i:i + args.batch_size] for i in range(0, args.calib, args.batch_size)]
    result = repair(spec.model.eval().to(args.device), calib, (x[args.calib:], positions[args.calib:]),
                    budget=Budget(args.budget, metric, args.max_cost), target=target, remedies=args.remedy or None,
                    selection=args.selection, max_trials=args.max_trials, out_dir=args.out, seed=args.seed,
                    batch_size=args.batch_size, executor=args.executor, progress=not args.quiet)
    return _finish(args, result, x[:1], [x[args.calib:args.calib + 8]], t0)


def _write_html(path: Path, markdown: str, image: str) -> None:
    import html

    rows, body = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if set(line.replace("|", "").strip()) <= set("-: "):
                continue
            rows.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
                        + "</tr>")
            continue
        if rows:
            body.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if rows:
        body.append("<table>" + "".join(rows) + "</table>")
    body.append(f'<img src="{html.escape(image)}" alt="KL per trial">')
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}"
             "td{padding:2px 8px;border-bottom:1px solid #ddd}")
    path.write_text(f"<!doctype html><meta charset=utf-8><title>qsurgery repair</title><style>{style}</style>"
                    + "\n".join(body))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsurgery", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("repair", help="the cheapest quantized model within an accuracy budget on a device "
                                      "(report, trial log, saved model, verified QDQ ONNX)")
    _add_common(r)
    r.set_defaults(target="per-tensor-int8", calib=32)
    r.add_argument("--out", type=Path, default=Path("qsurgery-repair"), help="output folder (default "
                   "qsurgery-repair); a rerun with the same arguments resumes from it")
    r.add_argument("--budget", type=float, default=1.0, help="points of --metric the model may lose (default 1)")
    r.add_argument("--metric", choices=("top1", "agreement"),
                   help="top1 (labeled --data) or agreement with float (default: top1 with --data, else agreement)")
    r.add_argument("--max-cost", type=float, help="largest cost relative to the plain quantized model")
    r.add_argument("--remedy", action="append", default=[], metavar="NAME",
                   help="allow only these remedies (repeatable; default: every one the target allows but "
                        "distillation, which takes minutes per trial)")
    r.add_argument("--max-trials", type=int, default=24)
    r.add_argument("--selection", type=float, default=0.5, help="share of evaluation images that decide "
                   "(the rest only report)")
    r.add_argument("--task", choices=("classify", "detect"), default="classify",
                   help="detect: --model module:factory returns a detector (model, decode, size, stretch) and "
                        "--data is a COCO-style folder; the budget is in mAP@0.5:0.95 points")
    _add_ray(r)
    r.add_argument("--no-export", dest="export", action="store_false", help="skip the verified QDQ ONNX")
    r.add_argument("--uint8-weights", action="store_true", help="store int8 weights as uint8 + 128 (same values): "
                   "exact integer kernels in onnxruntime on x86 CPUs without VNNI")
    r.set_defaults(func=_cmd_repair, distill=False)
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
    _add_ray(a)
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


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="ray", metavar="ADDRESS",
                   help="run the layer runs on Ray workers: a local Ray (no ADDRESS), or the cluster at ADDRESS "
                        "(host:port, ray://host:10001, auto); needs pip install 'qsurgery[ray]'")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per CPU of the cluster)")


def _check_arguments(args: argparse.Namespace) -> None:
    """Every cheap check, before any model is loaded: counts, paths, the output folder, Ray."""
    if getattr(args, "workers", None) is not None and getattr(args, "ray", None) is None:
        raise QSurgeryError("--workers is the number of Ray workers: give --ray too")
    if getattr(args, "ray", None) is not None:
        from .executor import get_executor

        args.executor = get_executor(args.ray, workers=args.workers)
    else:
        args.executor = None
    _check_device(getattr(args, "device", "cpu"))
    for name in ("calib", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise QSurgeryError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "eval", 0) < 0:
        raise QSurgeryError(f"--eval must be >= 0, got {args.eval}")
    if getattr(args, "sens_images", 2) < 2:
        raise QSurgeryError(f"--sens-images must be >= 2, got {args.sens_images}")
    if getattr(args, "data", None) is not None and not args.data.exists():
        raise QSurgeryError(f"--data {args.data} does not exist")
    if getattr(args, "checkpoint", None) is not None and not args.checkpoint.is_file():
        raise QSurgeryError(f"--checkpoint {args.checkpoint} is not a file")
    out = getattr(args, "out", None)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise QSurgeryError(f"--out {out} exists and is not a folder")
        parent = out
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise QSurgeryError(f"--out {out}: {parent} is a file, so the folder cannot be made")
        import os

        if not os.access(parent, os.W_OK):
            raise QSurgeryError(f"--out {out}: {parent} is not writable")
    if getattr(args, "metric", None) == "top1" and getattr(args, "sens_images", 0) and args.sens_images < 50:
        print(f"warning: --metric top1 on {args.sens_images} images moves in steps of {100 / args.sens_images:.1f} "
              "points; layers whose effect is smaller rank at 0 (--metric kl ranks them on any count)",
              file=sys.stderr)


def _check_device(device: str) -> None:
    """Refuse a --device this machine does not have, before any model is loaded."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise QSurgeryError(f"--device {device}: not a device name ({exc}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QSurgeryError(f"--device {device}: this torch sees no CUDA GPU (torch.cuda.is_available() is "
                                "False: no GPU, no driver, or a CPU-only torch build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QSurgeryError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                f"numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise QSurgeryError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise QSurgeryError(f"--device {device}: qsurgery runs on cpu, cuda or mps, not {dev.type}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_arguments(args)
        return args.func(args)
    except QSurgeryError as exc:
        print(f"qsurgery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; say what is kept and how to go on
        out = getattr(args, "out", None)
        resumable = args.func in (_cmd_repair, _cmd_analyze) and out is not None and out.is_dir()
        print("\nqsurgery: interrupted" + (f"; what was measured is kept in {out}/, and the same command continues "
                                           "from it" if resumable else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
