"""One traced aten op and its classification."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class OpRecord:
    """One aten op of a traced forward.

    ``module_path`` is the innermost module running it ("" for the top-level model, e.g. the
    loss); ``layer`` is its index in the decoder-layer list and ``path_in_layer`` the module path
    relative to that layer ("" for the layer itself), both None outside the layers.
    ``output_bytes`` counts newly allocated outputs only (views and in-place results are 0).
    ``flops`` uses torch.utils.flop_counter's formulas for matmuls and convolutions and ours for
    attention (`attention_flops`); 0 for element-wise ops. ``data_path`` is True when the op consumes a tensor derived from the input
    ids; the others (masks, rotary tables, positions) are auxiliary and stay out of the ratios.
    ``mixes`` lists the axes ("batch", "sequence", "hidden") the op reduces, contracts or mixes;
    it is filled when the traced sizes identify the axes (see `SKReport.axis_sizes`).

    The data flow, for plans that follow a tensor from op to op (`hf_bwsk.memory.plan`): ``producers``
    are the indices of the records whose outputs this op reads (identities, which get no record,
    are looked through); ``activation_input_numel`` counts the elements of its data-path inputs,
    which ``input_shapes`` alone cannot tell from auxiliary ones; ``relabels`` marks views and
    casts, which carry their input on whatever their kind says about the elements they drop or round.
    Records saved before these fields existed load with them empty.

    A loop over the sequence (one op group per token step, `hf_bwsk.analysis.steps`) sets
    ``repeats`` to its number of steps and ``step`` to this record's iteration on every record of
    the loop; ops outside loops have ``repeats=1, step=0``. Counts use the ``step == 0`` records
    (`is_logical`), bytes and FLOPs every record.
    """

    index: int
    op: str
    module_path: str
    module_class: str
    layer: int | None
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_bytes: int
    flops: int
    kind: str
    reason: str
    data_path: bool
    mixes: frozenset[str]
    path_in_layer: str | None = None
    producers: tuple[int, ...] = ()
    activation_input_numel: int = 0
    relabels: bool = False
    repeats: int = 1
    step: int = 0

    @property
    def is_logical(self) -> bool:
        """The record that stands for its op in counts: every op outside loops, a loop's first step."""
        return self.step == 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_shapes"] = [list(shape) for shape in self.input_shapes]
        data["output_shapes"] = [list(shape) for shape in self.output_shapes]
        data["mixes"] = sorted(self.mixes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> OpRecord:
        data = dict(data)
        data["input_shapes"] = tuple(tuple(shape) for shape in data["input_shapes"])
        data["output_shapes"] = tuple(tuple(shape) for shape in data["output_shapes"])
        data["mixes"] = frozenset(data["mixes"])
        data["producers"] = tuple(data.get("producers", ()))
        return cls(**data)
