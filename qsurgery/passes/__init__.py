"""Graph passes: FX graph -> new FX graph (the input graph is never modified), each returning a PassResult."""

from .common import PassResult, graph_cost
from .dw_to_dense import SeparableUnit, dw_to_dense, find_separable

__all__ = ["PassResult", "graph_cost", "dw_to_dense", "find_separable", "SeparableUnit"]
