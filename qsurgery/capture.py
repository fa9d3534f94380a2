"""Capture: turn a PyTorch model into a ``torch.fx.GraphModule`` that qsurgery can measure and rewrite.

The capture works on a deep copy in eval mode, keeps the original qualified module names, specialises
run-time padding (TF "same" padding in timm ``tf_*`` models) to the example input, splits timm's fused
``BatchNormAct2d`` into a plain ``BatchNorm2d`` plus its activation (so BN can be folded), and checks that
the graph computes what the model computes. When tracing fails it raises :class:`CaptureError` naming the
module and the construct, and the way out (``leaf_modules=[...]``).
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError
from .graph import pair, set_module

__all__ = ["capture", "CaptureError"]

# Modules qsurgery rewrites after tracing (kept as leaves while tracing, then replaced by plain modules).
_SAME_PAD_TYPES: tuple[type, ...] = ()
_NORM_ACT_TYPES: tuple[type, ...] = ()
# Modules known not to trace, kept opaque (they run in float and are not looked into).
_OPAQUE_TYPES: tuple[type, ...] = ()
_AUTOWRAP_FUNCTIONS: tuple[Any, ...] = ()

try:  # timm is a runtime dependency, but capture must work for plain torch models without it too
    import importlib

    _timm_conv_same = importlib.import_module("timm.layers.conv2d_same")
    _timm_norm_act = importlib.import_module("timm.layers.norm_act")
    _timm_pool_same = importlib.import_module("timm.layers.pool2d_same")

    _SAME_PAD_TYPES = (_timm_conv_same.Conv2dSame, _timm_pool_same.MaxPool2dSame, _timm_pool_same.AvgPool2dSame)
    _NORM_ACT_TYPES = tuple(
        t for t in (getattr(_timm_norm_act, n, None) for n in ("BatchNormAct2d", "SyncBatchNormAct",
                                                              "FrozenBatchNormAct2d")) if t is not None
    )
    try:
        from timm.layers._fx import get_notrace_functions, get_notrace_modules

        _OPAQUE_TYPES = tuple(
            t for t in get_notrace_modules() if not issubclass(t, _SAME_PAD_TYPES + _NORM_ACT_TYPES)
        )
        _AUTOWRAP_FUNCTIONS = tuple(get_notrace_functions())
    except ImportError:  # older timm
        pass
except ImportError:  # pragma: no cover - timm missing
    pass

_TRACE_ERROR_HINTS = (
    ("cannot be used as inputs to control flow",
     "data-dependent control flow (an `if`/`while`/`assert` or int()/bool() on a tensor value or size)"),
    ("object cannot be iterated", "iteration over a traced tensor (unpacking or a for-loop over a tensor)"),
    ("len() is not supported", "len() of a traced tensor"),
    ("cannot be used as a Python int", "a tensor value used as a Python number"),
)


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps chosen modules as leaves and remembers in which module tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: set[str] | frozenset[str] = frozenset()):
        # defaults: torch.load re-traces a saved GraphModule with its tracer class and no arguments
        super().__init__(autowrap_functions=_AUTOWRAP_FUNCTIONS)
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self._qs_stack: list[tuple[str, str]] = []
        self.failure_scope: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            path = f"<unregistered {type(m).__name__}>"
        self._qs_stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_scope is None:
                self.failure_scope = list(self._qs_stack)
            raise
        finally:
            self._qs_stack.pop()


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise CaptureError(
        "example_inputs must be a tensor or a tuple of tensors shaped like one real batch, "
        f"e.g. torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}"
    )


def _expected_input_hint(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return f" The first conv expects {m.in_channels} input channels, e.g. shape (1, {m.in_channels}, H, W)."
        if isinstance(m, nn.Linear):
            return f" The first linear layer expects {m.in_features} input features."
    return ""


def _resolve_leaves(model: nn.Module, leaf_modules: Iterable[str | type]) -> tuple[tuple[type, ...], set[str]]:
    names = dict(model.named_modules())
    types: list[type] = []
    paths: set[str] = set()
    for leaf in leaf_modules:
        if isinstance(leaf, type):
            if not issubclass(leaf, nn.Module):
                raise CaptureError(f"leaf_modules entry {leaf!r} is not an nn.Module subclass")
            types.append(leaf)
        elif isinstance(leaf, str):
            if leaf not in names:
                near = difflib.get_close_matches(leaf, list(names), n=5)
                raise CaptureError(
                    f"leaf_modules names {leaf!r}, which is not a module of this model"
                    + (f"; close names: {near}" if near else "")
                )
            paths.add(leaf)
        else:
            raise CaptureError(f"leaf_modules entries are module paths or classes, got {leaf!r}")
    return tuple(types) + _SAME_PAD_TYPES + _NORM_ACT_TYPES + _OPAQUE_TYPES, paths


def _describe_failure(exc: Exception) -> str:
    text = str(exc)
    for needle, meaning in _TRACE_ERROR_HINTS:
        if needle in text:
            return meaning
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _same_pads(in_hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
               dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """TF 'SAME' padding (left, right, top, bottom) for an input of spatial size ``in_hw``."""
    pads = []
    for size, k, s, d in zip(in_hw, kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _plain_same_pad(module: nn.Module, in_shape: torch.Size) -> tuple[tuple[int, int, int, int], float, nn.Module]:
    """The static pad and plain module that compute what a timm *Same module computes on ``in_shape``."""
    hw = tuple(in_shape[-2:])
    conv_same, max_same, _avg_same = _SAME_PAD_TYPES
    if isinstance(module, conv_same):
        pads = _same_pads(hw, module.weight.shape[-2:], pair(module.stride), pair(module.dilation))
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                          module.dilation, module.groups, module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        plain.load_state_dict(module.state_dict())
        return pads, 0.0, plain
    if isinstance(module, max_same):
        pads = _same_pads(hw, pair(module.kernel_size), pair(module.stride), pair(module.dilation))
        return pads, float("-inf"), nn.MaxPool2d(module.kernel_size, module.stride, 0, module.dilation,
                                                  ceil_mode=module.ceil_mode)
    pads = _same_pads(hw, pair(module.kernel_size), pair(module.stride), (1, 1))
    return pads, 0.0, nn.AvgPool2d(module.kernel_size, module.stride, 0, module.ceil_mode,
                                   module.count_include_pad)


def _plain_batchnorm(module: nn.Module) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with the statistics of a timm norm+act module (children drop/act kept)."""
    bn = nn.BatchNorm2d(module.num_features, eps=module.eps, affine=True,
                        device=module.running_mean.device, dtype=module.running_mean.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(module.running_mean)
        bn.running_var.copy_(module.running_var)
        bn.weight.copy_(module.weight if module.weight is not None else torch.ones_like(bn.weight))
        bn.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(bn.bias))
    bn.eval()
    return bn


def _specialise(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> None:
    """Replace run-time-padding and norm+act leaves by static pads and plain modules, in place."""
    targets = {n.target: n for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _SAME_PAD_TYPES)}
    shapes: dict[str, torch.Size] = {}
    if targets:
        hooks = [gm.get_submodule(t).register_forward_pre_hook(
            lambda _m, args, _t=t: shapes.__setitem__(_t, args[0].shape)) for t in targets]
        try:
            with torch.no_grad():
                gm(*example)
        finally:
            for h in hooks:
                h.remove()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if _SAME_PAD_TYPES and isinstance(module, _SAME_PAD_TYPES):
            if node.target not in shapes:  # never called on the example input: leave it as it is
                continue
            pads, value, plain = _plain_same_pad(module, shapes[node.target])
            set_module(gm, node.target, plain)
            if any(pads):
                with gm.graph.inserting_before(node):
                    pad = gm.graph.call_function(F.pad, (node.args[0], pads), {"value": value})
                pad.meta = dict(node.meta)
                node.args = (pad,) + tuple(node.args[1:])
        elif _NORM_ACT_TYPES and isinstance(module, _NORM_ACT_TYPES):
            bn = _plain_batchnorm(module)
            last = node
            for child in ("drop", "act"):
                sub = getattr(module, child, None)
                if sub is None or isinstance(sub, nn.Identity):
                    continue
                bn.add_module(child, sub)
                with gm.graph.inserting_after(last):
                    new = gm.graph.call_module(f"{node.target}.{child}", (last,))
                new.meta = dict(node.meta)
                last.replace_all_uses_with(new, delete_user_cb=lambda u, _new=new: u is not _new)
                last = new
            set_module(gm, node.target, bn)
    gm.graph.lint()
    gm.recompile()


def _reparameterize(model: nn.Module) -> Counter:
    """Collapse training-time branches into the single convs a deployed model runs, in place: every module
    with ``fuse()`` (replaced by its result), ``reparameterize()`` or ``switch_to_deploy()`` (timm's
    MobileOne, RepVGG, FastViT... and the same convention elsewhere). Returns the kinds collapsed, counted."""
    done: Counter = Counter()

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if callable(getattr(child, "fuse", None)):
                setattr(parent, name, child.fuse())
                done[kind] += 1
            elif callable(getattr(child, "reparameterize", None)):
                child.reparameterize()
                done[kind] += 1
            elif callable(getattr(child, "switch_to_deploy", None)):
                child.switch_to_deploy()
                done[kind] += 1
            walk(getattr(parent, name))

    walk(model)
    return done


def _bind_defaults(gm: fx.GraphModule, given: int) -> None:
    """Inputs the example did not give become their default constants, in place.

    A forward such as timm's ``(x, attn_mask=None, is_causal=False)`` traces those keywords as inputs; left so,
    the ONNX exporter turns ``is_causal`` into a tensor. The graph is specialised to the example: it takes what
    the example gave.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[given:]:
        if not node.args or str(node.target).startswith("*"):
            continue  # no default (or *args / **kwargs): keep it an input
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a, _n=node, _d=default: _d if a is _n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a, _n=node, _d=default: _d if a is _n else a)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _drop_identities(gm: fx.GraphModule) -> None:
    """Remove ``nn.Identity`` and (eval-mode) dropout calls: the graph is an inference graph."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(
            gm.get_submodule(node.target), (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
        ) and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _max_rel_diff(a: Any, b: Any) -> float:
    """Largest difference between two (nested) outputs, relative to the reference's magnitude."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return math.inf
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else math.inf
        scale = a.abs().max().item() if a.numel() else 0.0
        return (a - b).abs().max().item() / max(scale, 1e-6) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return math.inf
        return max((_max_rel_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return math.inf
        return max((_max_rel_diff(a[k], b[k]) for k in a), default=0.0)
    return 0.0 if a == b else math.inf


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
            leaf_modules: Iterable[str | type] = (), check: bool = True, rtol: float = 1e-4,
            reparameterize: bool = True) -> fx.GraphModule:
    """Trace ``model`` (a deep copy, in eval mode) into an FX graph specialised to ``example_inputs``' shape.

    ``leaf_modules`` lists module paths or classes to keep opaque (they run as they are, in float).
    With ``check`` the graph's output is compared with the model's on the example input (relative
    tolerance ``rtol``). ``reparameterize``: multi-branch training blocks (MobileOne, RepVGG: modules with
    ``reparameterize()``, ``fuse()`` or ``switch_to_deploy()``) are collapsed first into the single convs a
    deployed model runs, with a warning that says so; quantizing the branches apart is what makes RepVGG lose
    tens of points in int8. The user's model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() takes an nn.Module, got {type(model).__name__}")
    example = _as_tuple(example_inputs)
    leaf_types, leaf_names = _resolve_leaves(model, leaf_modules)
    work = copy.deepcopy(model).eval()

    with torch.no_grad():
        try:
            reference = work(*example)
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in example)
            raise CaptureError(
                f"the model fails on the example input of shape {shapes}: {type(exc).__name__}: {exc}."
                + _expected_input_hint(work)
            ) from exc

    collapsed = _reparameterize(work) if reparameterize else Counter()
    if collapsed:
        kinds = ", ".join(f"{n} {k}" for k, n in collapsed.most_common())
        warnings.warn(f"capture: collapsed {sum(collapsed.values())} multi-branch block(s) ({kinds}) into the single "
                      "convs a deployed model runs, before quantization; capture(..., reparameterize=False) keeps "
                      "the training-time branches", stacklevel=2)
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(work)
    except Exception as exc:
        construct = _describe_failure(exc)
        scope = [s for s in (tracer.failure_scope or []) if not s[0].startswith("<")]
        if scope:
            path, kind = scope[-1]
            raise CaptureError(
                f"tracing failed inside module '{path}' ({kind}): {construct}. Way out: keep it opaque with "
                f"capture(model, x, leaf_modules=[{path!r}]) (or leaf_modules=[{kind}] for every such module); "
                "it then runs in float, unquantized."
            ) from exc
        raise CaptureError(
            f"tracing failed in the top-level forward of {type(work).__name__}: {construct}. Way out: move that "
            "code into a submodule and pass it in leaf_modules=[...], or wrap the function with torch.fx.wrap."
        ) from exc

    gm = fx.GraphModule(work, graph, class_name=f"Captured{type(work).__name__}")
    _bind_defaults(gm, len(example))
    _specialise(gm, example)
    _drop_identities(gm)
    gm.delete_all_unused_submodules()
    gm.eval()  # modules made by the rewrite start in training mode
    ShapeProp(gm).propagate(*example)
    gm.meta["qsurgery_input_shapes"] = [tuple(t.shape) for t in example]
    gm.meta["qsurgery_source"] = type(model).__name__
    gm.meta["qsurgery_reparameterized"] = dict(collapsed)

    if check:
        with torch.no_grad():
            got = gm(*example)
        diff = _max_rel_diff(reference, got)
        if not diff <= rtol:
            raise CaptureError(
                f"the captured graph does not reproduce the model (max relative difference {diff:.3g} > {rtol}): "
                "the forward likely depends on something tracing cannot see (random ops, global state, or shape "
                "logic the example input does not exercise). Keep the offending module opaque with leaf_modules=[...]."
            )
    return gm


def input_shapes(gm: fx.GraphModule) -> list[tuple[int, ...]] | None:
    """The example-input shapes a graph was captured (and specialised) for, if it came from :func:`capture`."""
    return gm.meta.get("qsurgery_input_shapes") if hasattr(gm, "meta") else None
