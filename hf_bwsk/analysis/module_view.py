"""The published BWSK cards' view: leaf modules classified by class name, for comparison only.

The rule table is reconstructed from the published figures (docs/ANALYSIS.md): a class name
containing one of the S names is S, one containing a K name is K, anything else Gray. It counts
``Dropout(p=0)`` (an identity) as K, calls Tanh/Sigmoid K though they are bijective and Linear S
though it may narrow; the op-level analysis does not share these flaws.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .rules import GRAY, KINDS, K, S

# Substrings of class names, as the published rule table matched them (case-sensitive).
MODULE_S_NAMES = ("Linear", "Conv1d", "Embedding", "LayerNorm", "RMSNorm", "Softplus")
MODULE_K_NAMES = ("Dropout", "GELU", "ReLU", "Tanh", "Sigmoid", "Softmax")


def module_kind(class_name: str) -> str:
    """S, K or Gray for a leaf module class under the published rule table."""
    if any(name in class_name for name in MODULE_S_NAMES):
        return S
    if any(name in class_name for name in MODULE_K_NAMES):
        return K
    return GRAY


@dataclass(frozen=True)
class Leaf:
    path: str
    module_class: str
    kind: str


@dataclass
class ModuleView:
    """Leaf modules of a model with their published-table kind."""

    leaves: list[Leaf]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModuleView:
        return cls([
            Leaf(path, type(module).__name__, module_kind(type(module).__name__))
            for path, module in model.named_modules()
            if next(module.children(), None) is None
        ])

    def counts(self) -> dict[str, int]:
        found = Counter(leaf.kind for leaf in self.leaves)
        return {kind: found.get(kind, 0) for kind in KINDS}

    def ratios(self) -> dict[str, float]:
        """Fractions of leaves per kind (all 0.0 for a model without leaves)."""
        total = len(self.leaves)
        return {kind: (count / total if total else 0.0) for kind, count in self.counts().items()}

    def to_table(self) -> str:
        counts, ratios = self.counts(), self.ratios()
        lines = [
            f"Module view (published cards' leaf-module rule table): {len(self.leaves)} leaf modules",
            "  ".join(f"{kind} {counts[kind]} ({ratios[kind]:.1%})" for kind in KINDS),
            "",
            f"{'module class':<32} {'leaves':>6}  kind",
        ]
        by_class = Counter((leaf.module_class, leaf.kind) for leaf in self.leaves)
        for (module_class, kind), count in sorted(by_class.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"{module_class:<32} {count:>6}  {kind}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"leaves": [asdict(leaf) for leaf in self.leaves], "counts": self.counts(), "ratios": self.ratios()}

    @classmethod
    def from_dict(cls, data: dict) -> ModuleView:
        return cls([Leaf(**leaf) for leaf in data["leaves"]])
