"""Graph passes: FX graph -> new FX graph (the input graph is never modified), each returning a PassResult;
``equalize``, ``bias_correction``, ``learned_rounding`` and ``distill_quantized`` are the techniques for strict devices;
``assign_precision`` is the plan-level pass (graph + plan -> a mixed-precision plan)."""

from .assign_precision import PrecisionResult, assign_precision
from .bias_correction import bias_correction
from .common import PassResult, distill, graph_cost
from .distillation import distill_quantized
from .dw_to_dense import SeparableUnit, dw_to_dense, find_separable
from .equalize import absorb_high_bias, equalize, find_pairs
from .learned_rounding import learned_rounding
from .prune import ChannelGroups, PruningSensitivity, channel_groups, prune_channels, pruning_sensitivity
from .split_head import ChannelMerge, channel_ranges, find_heads, output_concats, split_head, split_output_concats

__all__ = ["PassResult", "graph_cost", "distill", "dw_to_dense", "find_separable", "SeparableUnit", "split_head",
           "find_heads", "channel_ranges", "ChannelMerge", "output_concats", "split_output_concats",
           "assign_precision", "PrecisionResult",
           "prune_channels", "channel_groups", "ChannelGroups", "pruning_sensitivity", "PruningSensitivity",
           "equalize", "absorb_high_bias", "find_pairs", "bias_correction", "learned_rounding",
           "distill_quantized"]
