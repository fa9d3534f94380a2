"""Export: float or QDQ ONNX that device compilers accept, simplified, and verified in onnxruntime.

The QDQ export writes exactly the simulation's numbers: one QuantizeLinear/DequantizeLinear pair per
activation quantizer (per-tensor scale and zero point), weights as integer initializers with a per-channel
DequantizeLinear (folded-BN weights), int16 where a layer was widened (opset >= 21), Cast pairs for fp16,
nothing where a layer is float. Files are written to a temporary name and moved into place.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .errors import QSurgeryError
from .graph import device_of, set_module
from .quant.config import TensorFormat
from .quant.observers import weight_integers
from .quant.simulate import ActQuantizer, SimulatedModel

__all__ = ["export_onnx", "ExportReport", "ExportError"]

DEFAULT_OPSET = 17


class ExportError(QSurgeryError):
    """The model cannot be exported as asked (unsupported op, unwritable path, uncalibrated simulation)."""


def _onnx_int_dtype(fmt: TensorFormat) -> torch.dtype:
    """The ONNX integer type that carries ``fmt`` (2..7-bit values travel in 8-bit types, exactly)."""
    if fmt.bits <= 8:
        return torch.int8 if fmt.symmetric else torch.uint8
    return torch.int16 if fmt.symmetric else torch.uint16


# torch's TorchScript exporter knows no uint16 and stops at opset 20: uint16 zero points travel as int32
# and are retyped after export, when the file's opset is raised to the one asked for (>= 21 for 16 bits).
_EXPORTER_MAX_OPSET = 20


def _carrier(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype == torch.uint16 else dtype


def _retype_uint16_zero_points(model) -> None:
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        name = node.input[2]
        tensor = inits.get(name) or (consts[name].attribute[0].t if name in consts else None)
        if tensor is None or tensor.data_type != onnx.TensorProto.INT32:
            continue
        value = numpy_helper.to_array(tensor).astype(np.uint16)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


class _QDQ(torch.autograd.Function):
    """Fake quantization in PyTorch; a QuantizeLinear/DequantizeLinear pair in ONNX."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, dtype):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=_carrier(dtype)))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _DequantizedWeight(torch.autograd.Function):
    """The (already fake-quantized) weight in PyTorch; integer constant + DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, w, q, scale, zero_point, axis: int):
        return w

    @staticmethod
    def symbolic(g, w, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class _ExportActQuant(nn.Module):
    def __init__(self, q: ActQuantizer):
        super().__init__()
        self.fmt = q.fmt
        self.active = q.mode == "quant"
        self.scale = float(q.scale)
        self.zero_point = int(q.zero_point)

    def forward(self, x):
        if not self.active or self.fmt.dtype == "float":
            return x
        if self.fmt.dtype == "fp16":
            return x.to(torch.float16).to(torch.float32)
        qmin, qmax = self.fmt.qrange
        if self.fmt.bits < 8:  # ONNX has no 2..7-bit types: a Clip to the narrow grid, then an 8-bit Q/DQ pair
            x = torch.clamp(x, (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale)
        return _QDQ.apply(x, self.scale, self.zero_point, qmin, qmax, _onnx_int_dtype(self.fmt))


class _ExportWeighted(nn.Module):
    """Calls the original module with its weight given as integers + DequantizeLinear."""

    def __init__(self, module: nn.Module, fmt: TensorFormat, scale: torch.Tensor, axis: int,
                 uint8_weights: bool = False):
        super().__init__()
        self.inner = module
        dtype = _onnx_int_dtype(fmt)
        q = weight_integers(module.weight.detach(), scale if fmt.per_channel else scale.reshape(()), fmt, axis)
        offset = 0
        if uint8_weights and dtype == torch.int8:  # same values, stored as uint8 with zero point 128
            dtype, offset = torch.uint8, 128
        self.register_buffer("q", (q + offset).to(dtype))
        self.register_buffer("s", scale.to(torch.float32).reshape(-1) if fmt.per_channel else scale.reshape(()))
        self.register_buffer("z", torch.full_like(self.s, offset, dtype=dtype))
        self.axis = axis

    def forward(self, x):
        w = _DequantizedWeight.apply(self.inner.weight, self.q, self.s, self.z, self.axis)
        if isinstance(self.inner, nn.Linear):
            return nn.functional.linear(x, w, self.inner.bias)
        if isinstance(self.inner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.inner._conv_forward(x, w, self.inner.bias)
        raise ExportError(f"integer weights of {type(self.inner).__name__} are not exported; keep it float or fp16")


def _export_module(sim: SimulatedModel, uint8_weights: bool = False) -> tuple[fx.GraphModule, dict[str, str]]:
    """A copy of the simulated graph whose quantizers and weights export as Q/DQ."""
    gm = copy.deepcopy(sim.graph_module)
    missing = [layer.name for layer in sim.plan if layer.activation is not None and layer.activation.is_int
               and layer.scale is None]
    if missing:
        raise ExportError(f"the simulated model was never calibrated (no range for {missing[:5]}): run quantize() "
                          "with calibration data")
    node_of_unit: dict[str, str] = {}
    for layer in sim.plan:
        path = sim._quantizers[layer.name]
        set_module(gm, path, _ExportActQuant(gm.get_submodule(path)))
        node_of_unit[layer.name] = path
        enabled = sim._enabled.get(layer.name, True)
        if layer.module is None or layer.weight is None or not enabled:
            continue
        module = gm.get_submodule(layer.module)
        with torch.no_grad():
            module.weight.copy_(sim._float_weights[layer.name])
        if layer.weight.is_int:
            axis = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
            set_module(gm, layer.module, _ExportWeighted(module, layer.weight, layer.weight_scale, axis,
                                                         uint8_weights and layer.weight.symmetric))
        elif layer.weight.dtype == "fp16":
            with torch.no_grad():
                module.weight.copy_(sim._quant_weights[layer.name])
    gm.recompile()
    return gm, node_of_unit


@dataclass
class ExportReport:
    """What was written and how well it matches the PyTorch model or simulation."""

    path: Path
    qdq: bool
    opset: int
    size_bytes: int
    nodes_before: int
    nodes_after: int
    qdq_pairs: int = 0
    int_weights: int = 0
    simplified: bool = False
    output_names: list[str] = field(default_factory=list)
    max_abs_error: float | None = None
    max_error_steps: float | None = None
    output_step: float | None = None
    top1_agreement: float | None = None
    verified_on: int = 0
    differences: list[str] = field(default_factory=list)
    ranges_path: Path | None = None
    runtime_max_abs_error: float | None = None
    runtime_max_error_steps: float | None = None
    runtime_top1_agreement: float | None = None
    layer_differences: list[tuple[str, float, float]] = field(default_factory=list)
    noise_floor_steps: float | None = None
    noise_floor_agreement: float | None = None
    integer_units: int = 0
    float_units: dict[str, str] = field(default_factory=dict)
    #: QDQ exports: True when the file computes the simulated arithmetic (its differences are at the float32
    #: noise floor, or start as 1-step rounding ties that the network amplifies), False when a layer differs
    matches_simulation: bool | None = None

    @property
    def verdict(self) -> str:
        """``matches_simulation`` in words ('' where it was not judged)."""
        return {True: "the file computes the simulated arithmetic", None: "",
                False: "the file does NOT compute the simulated arithmetic (see the differences)"}[
            self.matches_simulation]

    def summary(self) -> str:
        lines = [f"{'QDQ' if self.qdq else 'float'} ONNX {self.path} (opset {self.opset}, "
                 f"{self.size_bytes / 1e6:.2f} MB, nodes {self.nodes_before} -> {self.nodes_after} "
                 f"{'after onnxsim' if self.simplified else '(not simplified)'})"]
        if self.qdq:
            lines.append(f"  {self.qdq_pairs} activation Q/DQ pairs, {self.int_weights} integer weights")
        if self.max_abs_error is not None:
            text = (f"  verified on {self.verified_on} inputs, exact Q/DQ arithmetic (onnxruntime, optimizations off): "
                    f"max |onnx - torch| = {self.max_abs_error:.3g}")
            if self.max_error_steps is not None:
                text += f" ({self.max_error_steps:.2f} output quantization steps)"
            if self.top1_agreement is not None:
                text += f", top-1 agreement {100 * self.top1_agreement:.2f} %"
            lines.append(text)
        if self.runtime_max_abs_error is not None:
            text = (f"  onnxruntime default optimizations (its integer kernels) vs the integer-exact simulation "
                    f"({self.integer_units} integer units): max error {self.runtime_max_abs_error:.3g}")
            if self.runtime_max_error_steps is not None:
                text += f" ({self.runtime_max_error_steps:.2f} steps)"
            if self.runtime_top1_agreement is not None:
                text += f", top-1 agreement {100 * self.runtime_top1_agreement:.2f} %"
            lines.append(text)
        if self.noise_floor_steps is not None:
            text = (f"  float32 noise floor (the simulation against itself, one input at a time): "
                    f"{self.noise_floor_steps:.2f} steps")
            if self.noise_floor_agreement is not None:
                text += f", top-1 agreement {100 * self.noise_floor_agreement:.2f} %"
            lines.append(text)
        lines.extend(f"  {d}" for d in self.differences)
        if self.verdict:
            lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


def _count_nodes(model) -> int:
    return len(model.graph.node)


def _simplify(model):
    import onnxsim

    before = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    simplified, ok = onnxsim.simplify(model)
    after = {op: sum(n.op_type == op for n in simplified.graph.node) for op in before}
    if ok and after == before:
        return simplified, True
    # constant folding would turn integer weights back into float: simplify without it
    simplified, ok = onnxsim.simplify(model, skip_constant_folding=True)
    after = {op: sum(n.op_type == op for n in simplified.graph.node) for op in before}
    if ok and after == before:
        return simplified, True
    return model, False


def _ranges(model, sim: SimulatedModel) -> dict:
    """Per activation tensor: the float range and scale/zero point, keyed by the ONNX tensor name."""
    out = {}
    weights = _initializers(model)
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    layers = [layer for layer in sim.plan if layer.activation is not None and layer.activation.is_int
              and sim._enabled.get(layer.name, True)]
    for node, layer in zip(qnodes, layers):
        out[node.input[0]] = {"layer": layer.name, "min": layer.clip[0], "max": layer.clip[1],
                              "scale": layer.scale, "zero_point": layer.zero_point,
                              "dtype": _onnx_int_dtype(layer.activation).__repr__().replace("torch.", "")}
    return out


def _initializers(model) -> set[str]:
    return {i.name for i in model.graph.initializer}


def _leaves(obj: Any, kind: type) -> list[Any]:
    """The ``kind`` leaves of nested tuples/lists/dicts, in order (model outputs, or the graph's output nodes)."""
    if isinstance(obj, kind):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o, kind)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v, kind)]
    return []


def _flatten(out: Any) -> list[torch.Tensor]:
    return _leaves(out, torch.Tensor)


def _output_steps(sim: SimulatedModel) -> list[float | None]:
    """The quantization step of each model output (in ``_flatten`` order), None where it is not quantized.
    Errors are counted in each output's own steps: a split head's box and class outputs differ by 4x."""
    gm = sim.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    steps: list[float | None] = []
    for node in _leaves(out.args[0], fx.Node):
        while isinstance(node, fx.Node) and node.op != "call_module":
            node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        q = gm.get_submodule(node.target) if isinstance(node, fx.Node) else None
        steps.append(float(q.scale) if isinstance(q, ActQuantizer) and q.mode == "quant" and q.fmt.is_int
                     else None)
    return steps


def _in_steps(err: float, k: int, steps: Sequence[float | None]) -> float | None:
    return err / steps[k] if k < len(steps) and steps[k] else None


def export_onnx(model: nn.Module, path: str | Path, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                qdq: bool | None = None, opset: int = DEFAULT_OPSET, simplify: bool = True, verify: bool = True,
                verify_inputs: Any = None, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, calib_ranges_json: str | Path | None = None,
                uint8_weights: bool = False) -> ExportReport:
    """Write ``model`` (a captured/repaired graph, or a :class:`SimulatedModel` for QDQ) as ONNX at ``path``.

    ``qdq`` defaults to True for a SimulatedModel. ``verify`` runs the file in onnxruntime on
    ``example_inputs`` (and ``verify_inputs``, an iterable of batches, if given) and compares with PyTorch:
    its exact Q/DQ arithmetic with the simulation, its integer kernels with the integer-exact simulation.
    ``calib_ranges_json`` also writes per-tensor ranges for compilers that calibrate themselves.
    ``uint8_weights`` stores symmetric int8 weights as uint8 with zero point 128 (the same values): what
    onnxruntime on x86 CPUs without VNNI needs for exact integer convolutions (its uint8 x int8 ones
    saturate); keep int8 for TensorRT and device compilers that want zero-point-0 weights.
    """
    import onnx

    example = tuple(t.cpu() for t in ((example_inputs,) if isinstance(example_inputs, torch.Tensor)
                                      else tuple(example_inputs)))
    if device_of(model).type != "cpu":  # the exporter and onnxruntime run on the CPU: a CPU copy is written
        model = copy.deepcopy(model).cpu()
    is_sim = isinstance(model, SimulatedModel)
    qdq = is_sim if qdq is None else qdq
    if qdq and not is_sim:
        raise ExportError("a QDQ export needs the SimulatedModel returned by qsurgery.quantize(); "
                          "pass qdq=False to export a float graph")
    if calib_ranges_json is not None and not is_sim:
        raise ExportError("calib_ranges_json needs a SimulatedModel (that is where the ranges come from)")
    path = Path(path)
    if not path.parent.exists() or not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist or is not writable")
    if is_sim:
        wide = [layer.name for layer in model.plan for f in (layer.weight, layer.activation)
                if f is not None and f.is_int and f.bits > 8 and model._enabled.get(layer.name, True)]
        if qdq and wide and opset < 21:
            raise ExportError(f"int16 Q/DQ (layers {sorted(set(wide))[:5]}) need ONNX opset >= 21; pass opset=21")
        if qdq and opset < 13:
            raise ExportError("per-channel DequantizeLinear needs opset >= 13")
        module = _export_module(model, uint8_weights)[0] if qdq else _float_copy(model)
    else:
        module = copy.deepcopy(model).eval()
    module.eval()
    reference = model if qdq or not is_sim else module
    n_inputs = len(example)
    in_names = list(input_names or (["input"] if n_inputs == 1 else [f"input{i}" for i in range(n_inputs)]))
    with torch.no_grad():
        reference_out = _flatten(reference(*example))
    out_names = list(output_names or (["output"] if len(reference_out) == 1 else
                                      [f"output{i}" for i in range(len(reference_out))]))
    tmp_fd, tmp_name = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(tmp_fd)
    try:
        try:
            with warnings.catch_warnings():
                # the TorchScript exporter takes autograd.Function symbolics: exact Q/DQ nodes, no onnxscript
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*opset version.*")
                torch.onnx.export(module, example, tmp_name, dynamo=False,
                                  opset_version=min(opset, _EXPORTER_MAX_OPSET), input_names=in_names,
                                  output_names=out_names, do_constant_folding=True,
                                  dynamic_axes={n: {0: "batch"} for n in in_names + out_names})
        except Exception as exc:
            raise ExportError(_explain_export_failure(exc, model, opset)) from exc
        onnx_model = onnx.load(tmp_name)
        if opset > _EXPORTER_MAX_OPSET:
            _retype_uint16_zero_points(onnx_model)
            for imp in onnx_model.opset_import:
                if imp.domain in ("", "ai.onnx"):
                    imp.version = opset
        nodes_before = _count_nodes(onnx_model)
        simplified = False
        if simplify:
            onnx_model, simplified = _simplify(onnx_model)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, tmp_name)
        _user_mode(tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)

    report = ExportReport(path=path, qdq=qdq, opset=opset, size_bytes=path.stat().st_size,
                          nodes_before=nodes_before, nodes_after=_count_nodes(onnx_model), simplified=simplified,
                          output_names=out_names)
    if qdq:
        report.qdq_pairs = sum(n.op_type == "QuantizeLinear" for n in onnx_model.graph.node)
        weights = _initializers(onnx_model)
        report.int_weights = sum(n.op_type == "DequantizeLinear" and n.input[0] in weights
                                 for n in onnx_model.graph.node)
    if calib_ranges_json is not None:
        ranges = _ranges(onnx_model, model)
        _atomic_write(Path(calib_ranges_json), json.dumps(ranges, indent=1))
        report.ranges_path = Path(calib_ranges_json)
    if verify:
        _verify(report, reference, example, verify_inputs, in_names, uint8_weights)
    return report


def _float_copy(sim: SimulatedModel) -> fx.GraphModule:
    gm, _ = _export_module(sim)
    for m in gm.modules():
        if isinstance(m, _ExportActQuant):
            m.active = False
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, _ExportWeighted):
            set_module(gm, name, mod.inner)
    return gm


def _atomic_write(path: Path, text: str) -> None:
    if not path.parent.exists() or not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist or is not writable")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _user_mode(tmp)
    os.replace(tmp, path)


def _user_mode(path: str) -> None:
    """Give a file written through ``mkstemp`` (mode 0600) the permissions any new file of the user gets
    (0666 less the umask), so that the model can be read where ``plan.json`` beside it can."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _explain_export_failure(exc: Exception, model: nn.Module, opset: int) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = ""
    gm = model.graph_module if isinstance(model, SimulatedModel) else model
    if isinstance(gm, fx.GraphModule):
        import re

        m = re.search(r"operator '?(?:aten::)?([A-Za-z0-9_]+)'?", text)
        if m:
            op = m.group(1)
            def named(n):
                calls = ("call_function", "call_method", "call_module")
                return getattr(n.target, "__name__", str(n.target)) if n.op in calls else ""

            hits = [n for n in gm.graph.nodes if named(n) and (op in named(n) or named(n) in op)]
            if hits:
                from .graph import scope_of

                where = f" (used by {hits[0].name!r} in module {scope_of(hits[0]) or '<top level>'!r})"
    hint = ""
    if "not factor of input size" in text:
        hint = (". The model pools a feature map into more cells than it has (an input smaller than the model was "
                "made for): capture and export at the model's own input size")
    return f"ONNX export failed at opset {opset}: {text}{where}{hint}"


def _compare(session, model: nn.Module, batches: list, in_names: list[str], out_names: list[str],
             steps: Sequence[float | None] = ()) -> tuple[float, float | None, str | None, int, int, int, int]:
    """Max |difference| (absolute, and in each output's own steps), the output where it is largest, top-1
    agreement of the first output, the number of inputs and the batch where the difference is largest."""
    max_err, max_steps, worst, worst_key, agree, rows, n, worst_batch = 0.0, None, None, 0.0, 0, 0, 0, 0
    for b, inputs in enumerate(batches):
        with torch.no_grad():
            ref = _flatten(model(*inputs))
        got = session.run(None, {k: v.detach().cpu().numpy() for k, v in zip(in_names, inputs)})
        for i, (r, g) in enumerate(zip(ref, got)):
            r = r.detach().cpu().numpy()
            err = float(np.abs(r - g).max()) if r.size else 0.0
            err_steps = _in_steps(err, i, steps)
            if err_steps is not None:
                max_steps = err_steps if max_steps is None else max(max_steps, err_steps)
            key = err_steps if err_steps is not None else err
            if key > worst_key:
                worst_key, worst, worst_batch = key, out_names[i] if i < len(out_names) else str(i), b
            max_err = max(max_err, err)
            if r.ndim == 2 and i == 0:
                agree += int((r.argmax(1) == g.argmax(1)).sum())
                rows += r.shape[0]
        n += inputs[0].shape[0]
    return max_err, max_steps, worst, agree, rows, n, worst_batch


def _verify(report: ExportReport, model: nn.Module, example: tuple, extra: Any, in_names: list[str],
            uint8_weights: bool = False) -> None:
    """Compare with PyTorch twice: onnxruntime with graph optimizations off runs the file's exact Q/DQ
    arithmetic (what the file *means*), compared with the simulation; with its default optimizations it runs
    its own integer kernels (what one runtime *does*), compared with the integer-exact simulation."""
    import onnxruntime as ort

    batches = [example]
    if extra is not None:
        from .quant.simulate import iter_inputs

        batches += list(iter_inputs(extra, len(example), what="verification"))
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(report.path), exact, providers=["CPUExecutionProvider"])
    steps = _output_steps(model) if isinstance(model, SimulatedModel) else []
    max_err, max_steps, worst, agree, rows, n, worst_batch = _compare(session, model, batches, in_names,
                                                                      report.output_names, steps)
    report.max_abs_error = max_err
    report.verified_on = n
    report.output_step = steps[0] if steps else None
    report.max_error_steps = max_steps
    if rows:
        report.top1_agreement = agree / rows
    if worst is not None and (max_steps > 1 if max_steps is not None else max_err > 1e-4):
        report.differences.append(f"largest difference in output {worst!r}")
    if report.qdq and isinstance(model, SimulatedModel):
        _trace_layers(report, model, batches[worst_batch], in_names, exact)
        if (max_steps is not None and max_steps > 1) or (rows and agree < rows):
            _noise_floor(report, model, batches, steps)
        ties = bool(report.layer_differences) and _ties(report.layer_differences[0])
        if max_steps is not None:
            report.matches_simulation = _at_floor(report, report.noise_floor_steps or 0.0) or ties
        else:  # a float output: its quantized activations decide
            report.matches_simulation = not report.layer_differences or ties
    if report.qdq and isinstance(model, SimulatedModel):
        from .quant.integer import integer_model

        twin = integer_model(model)
        report.integer_units = len(twin.integer_units)
        report.float_units = dict(twin.float_units)
        runtime = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        r_err, r_steps, _w, r_agree, r_rows, _n, _b = _compare(runtime, twin, batches, in_names, report.output_names,
                                                           steps)
        report.runtime_max_abs_error = r_err
        report.runtime_max_error_steps = r_steps
        if r_rows:
            report.runtime_top1_agreement = r_agree / r_rows
        full_int8 = any(layer.weight is not None and layer.weight.is_int and layer.weight.symmetric
                        and layer.weight.bits == 8 for layer in model.plan)
        if r_steps is not None and r_steps > 1 and full_int8 and not uint8_weights:
            report.differences.append(
                "onnxruntime's fused integer kernels (default optimizations) deviate from the integer-exact "
                f"simulation by {r_steps:.1f} steps: on x86 CPUs without VNNI its uint8 x int8 convolutions "
                "saturate 16-bit intermediate sums when weights use the full int8 range. The file is right; for "
                "onnxruntime on such CPUs export with uint8_weights=True (same values, exact uint8 x uint8 "
                "kernels), or simulate 7-bit weights: QuantConfig.int8().override('*', weight_bits=7).")


def _noise_floor(report: ExportReport, sim: SimulatedModel, batches: list,
                 steps: Sequence[float | None] | None = None) -> None:
    """How far the simulation moves from itself when only the order of its float32 sums changes (one input at
    a time instead of batches: PyTorch picks other convolution algorithms). Differences between the file and
    the simulation at this level are rounding noise, amplified by the network, not a wrong file."""
    steps = _output_steps(sim) if steps is None else steps
    floor, agree, rows = None, 0, 0
    with torch.no_grad():
        for inputs in batches:
            ref = _flatten(sim(*inputs))
            single = [_flatten(sim(*[t[i:i + 1] for t in inputs])) for i in range(inputs[0].shape[0])]
            for k, r in enumerate(ref):
                one = torch.cat([s[k] for s in single])
                err = _in_steps(float((r - one).abs().max()), k, steps) if r.numel() else None
                if err is not None:
                    floor = err if floor is None else max(floor, err)
                if r.dim() == 2 and k == 0:
                    agree += int((r.argmax(1) == one.argmax(1)).sum())
                    rows += r.shape[0]
    report.noise_floor_steps = floor
    report.noise_floor_agreement = agree / rows if rows else None
    if floor is not None and report.max_error_steps is not None:
        report.differences.append(
            f"the simulation differs from itself by up to {floor:.1f} steps"
            + (f" (top-1 agreement {100 * agree / rows:.2f} %)" if rows else "")
            + " when only the order of its float32 sums changes: the file's differences " + _verdict(report, floor))


def _ties(first: tuple[str, float, float]) -> bool:
    """A first difference that is float32 rounding ties: one step (up to float32 error in the step), on under
    1 % of values (a wrong scale or zero point moves most of them)."""
    return first[1] < 1.5 and first[2] < 1e-2


def _at_floor(report: ExportReport, floor: float) -> bool:
    """The file's largest output difference is within twice the simulation's own float32 noise (>= 1 step)."""
    return report.max_error_steps <= 2 * max(floor, 1.0)


def _verdict(report: ExportReport, floor: float) -> str:
    if _at_floor(report, floor):
        return "are at that level"
    if not report.layer_differences:
        return "are larger than that, and no quantized activation shows where they start: check the outputs"
    first = report.layer_differences[0]
    if _ties(first):
        return (f"are larger than that, yet they start as 1-step rounding ties at {first[0]!r} that the network "
                "amplifies (see above), not as a wrong layer: the file computes the simulated arithmetic; the "
                "reordered simulation happens to meet fewer ties")
    return (f"are larger than that and start at {first[0]!r} with up to {first[1]:.0f} steps on "
            f"{100 * first[2]:.2g} % of its values: more than rounding; check that layer's export")


def _trace_layers(report: ExportReport, sim: SimulatedModel, example: tuple, in_names: list[str], options) -> None:
    """Where the file and the simulation part: per quantized activation, on the inputs given (the batch whose
    outputs differ most), the largest
    difference in quantization steps and the share of values that differ."""
    import re

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(report.path))
    index_to_unit = {int(path.rsplit(".q", 1)[1]): name for name, path in sim._quantizers.items()}
    tapped: dict[str, str] = {}
    for node in model.graph.node:
        m = re.match(r"/q(\d+)/DequantizeLinear", node.name) if node.op_type == "DequantizeLinear" else None
        if m and int(m.group(1)) in index_to_unit:
            tapped[index_to_unit[int(m.group(1))]] = node.output[0]
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                                         None))
    if not tapped:
        return
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(tapped)
    got = session.run([tapped[n] for n in names], {k: v.detach().cpu().numpy() for k, v in zip(in_names, example)})
    seen: dict[str, np.ndarray] = {}
    hooks = [sim.quantizer(n).register_forward_hook(
        lambda _m, _i, out, _n=n: seen.__setitem__(_n, out.detach().cpu().numpy())) for n in names]
    try:
        with torch.no_grad():
            sim(*example)
    finally:
        for h in hooks:
            h.remove()
    for name, value in zip(names, got):
        step = sim.plan[name].scale or 1.0
        if name not in seen or seen[name].shape != value.shape:
            continue
        diff = np.abs(seen[name] - value) / step
        if diff.max() > 0.5:
            report.layer_differences.append((name, float(diff.max()), float((diff > 0.5).mean())))
    if report.layer_differences:
        first = report.layer_differences[0]
        worst = max(report.layer_differences, key=lambda t: t[1])
        report.differences.append(
            f"first difference at {first[0]!r}: {100 * first[2]:.4f} % of values, up to {first[1]:.0f} step(s) "
            + ("(float32 rounding ties: the two runtimes sum convolutions in different orders); the network "
               f"amplifies them up to {worst[1]:.0f} steps at {worst[0]!r}" if _ties(first) else
               f"(more than rounding ties); the largest, {worst[1]:.0f} steps, at {worst[0]!r}"))
