"""`hf_bwsk._compat`: every private torch/transformers/accelerate name we use lives there, and each works here.

The import contract (pyproject.toml) forbids torch's private modules elsewhere; this file checks what
no import contract sees (``torch._C`` and other attributes, underscored names imported from public
modules) and exercises every probed name on the installed releases.
"""

import ast
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from transformers import Trainer

from hf_bwsk import _compat

PACKAGE = Path(__file__).resolve().parent.parent / "hf_bwsk"
FOREIGN_ROOTS = ("torch", "transformers", "accelerate", "huggingface_hub", "peft", "trl")
# Private attributes of foreign objects that `_compat` wraps: nowhere else may name them.
FOREIGN_PRIVATE_ATTRIBUTES = {
    "_version", "_base", "_schema", "_overloadpacket", "_forward_cls", "_local_mapping", "_global_mapping",
    "_attn_implementation", "_require_grads_hooks", "_shared_state", "_C",
}


def _chain(node: ast.AST) -> list[str]:
    """``torch.utils.checkpoint`` as ['torch', 'utils', 'checkpoint'] (empty for anything not a dotted name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def private_uses(source: str) -> list[str]:
    """Each private foreign name ``source`` reaches, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in FOREIGN_ROOTS:
            private = [part for part in node.module.split(".") if part.startswith("_")]
            private += [alias.name for alias in node.names if alias.name.startswith("_")]
            found += [f"{line}: from {node.module} import {name}" for name in private]
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] in FOREIGN_ROOTS and "._" in alias.name]
        elif isinstance(node, ast.Attribute):
            chain = _chain(node)
            # aten op names may start with an underscore (torch.ops.aten._to_copy): those are ops, not private API.
            if chain[:1] == ["torch"] and chain[1:2] != ["ops"] and any(part.startswith("_") for part in chain[1:]):
                found.append(f"{line}: {'.'.join(chain)}")
            elif node.attr in FOREIGN_PRIVATE_ATTRIBUTES:
                found.append(f"{line}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in FOREIGN_PRIVATE_ATTRIBUTES):
            found.append(f"{line}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_no_module_but_compat_uses_a_private_torch_transformers_or_accelerate_name():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "_compat.py":
            uses = private_uses(path.read_text())
            if uses:
                offenders[str(path.relative_to(PACKAGE))] = uses
    assert not offenders, f"private names outside hf_bwsk/_compat.py (move them there): {offenders}"


def test_the_scan_finds_each_kind_of_private_use():
    source = ("import torch.utils._pytree\nfrom torch.utils.checkpoint import _detach_helper\n"
              "from torch.utils._python_dispatch import TorchDispatchMode\nx = torch._C._current_graph_task_id()\n"
              "v = t._version\nn = getattr(config, '_attn_implementation', None)\nop = torch.ops.aten._to_copy.default\n")
    lines = sorted({int(use.split(":")[0]) for use in private_uses(source)})
    assert lines == [1, 2, 3, 4, 5, 6], private_uses(source)  # line 7 names an aten op, not a private API


def test_versions_and_views():
    x = torch.zeros(4)
    before = _compat.tensor_version(x)
    x.add_(1)
    assert _compat.tensor_version(x) == before + 1
    view = x[:2]
    assert _compat.view_base(view) is x and _compat.view_base(x) is None


def test_cached_tensor_hands_back_its_value_and_refuses_it_once_written_in_place():
    base = torch.ones(3, requires_grad=True) * 2
    cached = _compat.CachedTensor(_compat.detach_for_cache(base))
    assert not cached.val.requires_grad and torch.equal(cached.get_val(False), base)
    base.mul_(3)  # the detached cache shares the storage and the version counter
    assert cached.get_val(True) is cached.val
    with pytest.raises(RuntimeError, match="modified in place"):
        cached.get_val(False)
    assert _compat.CachedTensor(7).get_val(False) == 7


def test_op_schema_and_packet():
    mm = torch.ops.aten.mm.default
    assert _compat.op_packet(mm) is torch.ops.aten.mm
    assert [argument.name for argument in _compat.op_schema(mm).arguments] == ["self", "mat2"]
    assert torch.ops.aten.detach.default in _compat.IGNORED_BY_CHECKPOINT


def test_saved_tensor_hooks_and_backward_state():
    assert _compat.checkpoint_saved_tensor_hooks() is None

    def pack(tensor):
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, pack):
        hooks = _compat.checkpoint_saved_tensor_hooks()
    assert hooks is not None and hooks[0] is pack
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda grad: seen.append(_compat.in_backward()))
    y.sum().backward()
    assert seen == [True] and not _compat.in_backward()
    assert _compat.autograd_function_of(y.grad_fn) is None


def test_autograd_function_of_a_custom_function_node():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    out = Double.apply(torch.ones(2, requires_grad=True))
    assert _compat.autograd_function_of(out.grad_fn) is Double


def test_transformers_names():
    model = tiny_model("llama")
    assert _compat.attention_implementation(model.config) in ("sdpa", "eager")
    assert _compat.local_attention_function("sdpa") is None  # nothing registered by this process
    assert not _compat.has_input_require_grads_hook(model)
    model.enable_input_require_grads()
    assert _compat.has_input_require_grads_hook(model)


def test_torch_flop_registry_and_its_shape_wrapper():
    assert _compat.flop_formula_of(torch.ops.aten.mm) is not None and _compat.flop_formula_of(torch.ops.aten.add) is None
    double = _compat.shape_formula(lambda shape, out_shape=None: 2 * shape[0])
    assert double(torch.zeros(5), out_val=None) == 10 and double.__wrapped__(torch.Size([5])) == 10


def test_trainer_still_has_the_loads_a_variant_trainer_overrides():
    # experiments/variant.py overrides these two private Trainer methods: a rename must fail here.
    assert callable(getattr(Trainer, "_load_from_checkpoint", None))
    assert callable(getattr(Trainer, "_load_best_model", None))
