"""Traced graphs shared by AOTInductor packages (mlip.deploy.aoti) and compiled training steps
(mlip.train.compiled): make_fx tracing with symbolic sizes, and the rewrites that keep Inductor's
multi-threaded CPU code right.

Inductor lowers ``index_add`` (the backward of a row gather) to an accumulating ``index_put``, and
its multi-threaded CPU code for that gave wrong sums (torch 2.13: an AOTI package's forces off by
0.14-0.78 relative at 2 threads, right at 1 thread; energies right); its ``scatter_add`` is right
at any thread count. So index_adds are rewritten as scatter_adds, and, for a graph that torch.compile
differentiates again, row gathers as ``gather`` (whose backward is a scatter_add, not an index_add).
"""

import torch


def trace(function, example) -> torch.fx.GraphModule:
    """``function(*example)`` traced by make_fx into one graph (autograd calls inside it become
    ordinary operations), sizes symbolic. Duck shaping is off: it would tie a size to any other of
    equal value in the example (N or E to a weight dimension) and specialize both."""
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    with fx_config.patch(use_duck_shape=False):
        return make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)


def index_adds_as_scatters(graph: torch.fx.GraphModule) -> None:
    """Rewrite, in place, each ``index_add(x, 0, index, source)`` (the backward of a row gather) as
    ``scatter_add(x, 0, index expanded over source's other dimensions, source)``.

    Same sums (see the module's docstring for why), so the same results up to summation order."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.index_add.default, aten.index_add_.default):
            continue
        x, dim, index, source = node.args[:4]
        if dim != 0 or node.kwargs or len(node.args) > 4:
            continue
        with graph.graph.inserting_before(node):
            expanded = _expanded(graph, index, source)
            scatter = aten.scatter_add_.default if node.target is aten.index_add_.default else aten.scatter_add.default
            replacement = graph.graph.call_function(scatter, (x, 0, expanded, source))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.graph.erase_node(node)
    graph.recompile()


def selects_as_gathers(graph: torch.fx.GraphModule) -> None:
    """Rewrite, in place, each ``index_select(x, 0, index)`` (a row gather) as ``gather(x, 0, index
    expanded over x's other dimensions)``: the same rows, but a graph that is differentiated again
    (a compiled training step) then takes its gradient as a scatter_add, not as an index_add
    (see :func:`index_adds_as_scatters`)."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index_select.default or node.args[1] != 0:
            continue
        x, _, index = node.args
        with graph.graph.inserting_before(node):
            replacement = graph.graph.call_function(aten.gather.default, (x, 0, _expanded(graph, index, x)))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.graph.erase_node(node)
    graph.recompile()


def _expanded(graph: torch.fx.GraphModule, index: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """A node of ``index`` (K,) expanded to (K, *like's other dimensions) (a view: stride 0), sizes
    known only at run time (the number of edges) read off ``like``."""
    aten = torch.ops.aten
    shape = like.meta["val"].shape
    expanded, sizes = index, [-1]
    for d, size in enumerate(shape[1:], 1):
        expanded = graph.graph.call_function(aten.unsqueeze.default, (expanded, -1))
        sizes.append(size if isinstance(size, int) else graph.graph.call_function(aten.sym_size.int, (like, d)))
    if len(shape) > 1:
        expanded = graph.graph.call_function(aten.expand.default, (expanded, sizes))
    return expanded
