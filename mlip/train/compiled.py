"""Compiled training steps (``compile: true``): torch.compile for the forward and backward of a step.

torch.compile cannot differentiate twice through a graph it compiled ("double backward"), and a
force loss needs exactly that: forces are a first derivative of the energy, and the loss of the
forces is differentiated again, with respect to the weights. So the training forward (energies and
their autograd forces, virial and stress, ``Potential.forward`` with ``create_graph``) is first
traced by ``make_fx`` into one graph in which the force computation is ordinary operations, with
the weights as inputs (as for AOTInductor packages, :mod:`mlip.deploy.aoti`); torch.compile then
compiles that graph and its first-order backward. The model's code is unchanged: one autograd path.

Sizes: the graph is traced with symbolic numbers of atoms, edges and structures (no duck shaping:
equal sizes stay independent), and torch.compile keeps them dynamic. Tracing specializes sizes 0
and 1 (a broadcast), so a batch with such a size (e.g. a last batch of one structure) is traced
and compiled again, once: the graphs are kept by the batch's keys, dtypes, the paired-edges flag
and which sizes are 0 or 1.

Inductor's kernels take torch's thread count at run time (``cpp.dynamic_threads``). Before they are
compiled, each row gather (index_select) is traced as a gather and each index_add as a scatter_add
(:mod:`mlip.traced`), so that neither the graph
nor the backward torch.compile derives from it holds an accumulating index_put: Inductor's
multi-threaded lowering of that op gave wrong sums (AOTI packages: forces off by 0.14-0.78 relative
at 2 threads), which is why these kernels ran on one thread before. Matrix products are calls into
ATen and use torch's threads either way.

Evaluation (``model.eval()``) runs the model as it is: validation is a small part of a run, and
its forces need no graph.
"""

from typing import Dict, Tuple

import torch
from torch import nn

from ..data import keys
from ..traced import index_adds_as_scatters, selects_as_gathers, trace


class CompiledTraining(nn.Module):
    """``model`` (a Potential or PropertyModel) whose training-mode forward runs compiled; same
    inputs (a batch dict), same outputs. The weights stay the model's own tensors, so the optimizer,
    EMA, checkpoints and DistributedDataParallel see no difference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._graphs: Dict[Tuple, nn.Module] = {}

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self.model.training:  # the trainer switches the model itself
            return self.model(data)
        # The paired-edges flag is read on the host (a Python bool): traced as a constant of the graph.
        paired = keys.EDGES_PAIRED in data and bool(data[keys.EDGES_PAIRED])
        tensors = {name: value for name, value in data.items() if name != keys.EDGES_PAIRED}
        kind = (paired, tuple((name, value.dtype, tuple(min(size, 2) for size in value.shape))
                              for name, value in sorted(tensors.items())))
        graph = self._graphs.get(kind)
        if graph is None:
            graph = self._graphs[kind] = self._compile(tensors, paired)
        return graph(dict(self.model.named_parameters()), dict(self.model.named_buffers()), tensors)

    def _compile(self, tensors: Dict[str, torch.Tensor], paired: bool) -> nn.Module:
        from torch.func import functional_call

        model = self.model
        flag = {keys.EDGES_PAIRED: torch.tensor(True)} if paired else {}

        def training_forward(parameters, buffers, batch):
            return functional_call(model, (parameters, buffers), (dict(batch, **flag),))

        example = (dict(model.named_parameters()), dict(model.named_buffers()), tensors)
        graph = trace(training_forward, example)
        reattach_saved_outputs(graph)
        # Gathers and index_adds as gather / scatter_add, here and in the backward derived from it: no
        # accumulating index_put, whose multi-threaded lowering gives wrong sums (see mlip.traced).
        selects_as_gathers(graph)
        index_adds_as_scatters(graph)
        return torch.compile(graph, dynamic=True, options={"cpp.dynamic_threads": True})


def reattach_saved_outputs(graph: torch.fx.GraphModule) -> None:
    """Remove every ``detach`` from a traced training forward, in place.

    make_fx records autograd's unpacking of a tensor saved for a backward formula as ``detach``
    when the tensor is an op's own output (sigmoid, tanh, exp, sqrt... save their result): the
    traced forces then are right, but their derivative with respect to the weights misses every
    path through those results (wrong gradients, which finite differences of the loss expose). In
    eager autograd with create_graph the unpacked tensor keeps its graph: without the detaches the
    traced graph does the same. The model's own
    detaches cut nothing a training loss differentiates: a potential detaches its edge vectors
    from the positions (which are no weights) and a committee's per-member outputs (no loss reads
    them)."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()


__all__ = ["CompiledTraining"]
