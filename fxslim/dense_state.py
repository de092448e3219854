"""What unstructured pruning leaves for the repair that follows it: the dense state kept in the model's meta
(`magnitude_prune` writes it, `asr` reads and drops it) and the one definition of the layers both work on.
A neutral module, so that no pass imports another. It never changes a weight."""

from __future__ import annotations

from torch import fx, nn

from fxslim.errors import PassError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DENSE_META = "fxslim_dense_state"  # {state_dict key: tensor} of the model before its first magnitude_prune


def prunable_layers(gm: fx.GraphModule, ignore=()) -> dict[str, nn.Module]:
    """The conv/linear modules the graph calls (each once, in graph order), less the ignored names."""
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    unknown = sorted(set(ignore) - names)
    if unknown:
        raise PassError(f"ignore names modules the graph does not call: {unknown}")
    out: dict[str, nn.Module] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target not in ignore and n.target not in out:
            m = gm.get_submodule(n.target)
            if isinstance(m, PRUNABLE):
                out[str(n.target)] = m
    return out


def remember_dense(out: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Keep a copy of the state the model had before its first magnitude pruning (a copy, not references:
    later passes such as bn_recalibrate deep-copy the module and change buffers in place)."""
    if DENSE_META not in gm.meta:
        out.meta[DENSE_META] = {k: v.detach().clone() for k, v in gm.state_dict().items()}
