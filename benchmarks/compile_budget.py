"""What `torch.compile` keeps for backward and computes under `activation_memory_budget`, read off its partition.

`torch._functorch.config.activation_memory_budget` (0..1) tells AOTAutograd's min-cut partitioner how
much of the activation memory between "recompute everything it can" (0) and "save everything" (1) the
forward may keep. Inductor runs its kernels outside torch's dispatcher, so a dispatch-mode tracker
sees neither their bytes nor their FLOPs. The partition itself is what the budget decides, so this
backend makes the same decisions as inductor (its decompositions, the min-cut partitioner with
``compiler="inductor"``) and then runs the forward and backward graphs op by op:

* kept bytes: the backward graph's saved inputs (every placeholder that is neither a tangent nor a
  forward input, i.e. not a weight or the batch), summed over the compiled graphs;
* FLOPs: `torch.utils.flop_counter` over the forward and backward graphs as they run, recompute
  included, attention by `hf_bwsk.analysis.attention_flops` (as `count_train_flops` counts eager steps).

Inductor's fusion changes transients, not what is saved: the whole-step peak of a compiled step is
not measured here (on CUDA, `torch.cuda.max_memory_allocated` would give it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_bwsk.analysis.attention_flops import ATTENTION_FLOP_FORMULAS


@dataclass
class PartitionCounts:
    """What the compiled graphs of one model saved for backward and computed."""

    kept_bytes: int = 0
    flops: int = 0
    graphs: int = 0

    def compiler(self, graph: torch.fx.GraphModule, example_inputs, *, backward: bool):
        if backward:
            self.graphs += 1
            self.kept_bytes += sum(_placeholder_bytes(node) for node in graph.graph.nodes
                                   if node.op == "placeholder" and not node.name.startswith(("tangents", "primals")))

        def run(*args):
            # A fresh counter per call: entering one clears its counts.
            with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS) as counter:
                outputs = graph(*args)
            self.flops += counter.get_total_flops()
            return outputs

        run._boxed_call = getattr(graph, "_boxed_call", False)
        return run


def _placeholder_bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def compile_with_budget(model: torch.nn.Module, budget: float) -> tuple[torch.nn.Module, PartitionCounts]:
    """``model`` compiled so that its partition under ``budget`` is counted; call it within `budget_context`."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import select_decomp_table

    counts = PartitionCounts()

    def compiler(backward):
        return lambda graph, inputs: make_boxed_func(counts.compiler(graph, inputs, backward=backward))

    backend = aot_autograd(
        fw_compiler=compiler(False),
        bw_compiler=compiler(True),
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    return torch.compile(model, backend=backend), counts


def budget_context(budget: float):
    """The functorch config under which the compiled step partitions (set while it compiles)."""
    return torch._functorch.config.patch(activation_memory_budget=budget)
