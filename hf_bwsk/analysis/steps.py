"""Recognising a loop over the sequence: the same op group run once per token step.

A recurrent reference implementation (Mamba's selective scan on CPU) runs a Python loop with one
iteration per position, so its trace holds the same few ops ``seq_len`` times. Counted one by one
they measure the loop, not the model: the count ratios and the sync points would change with the
sequence length. Here such a loop is found in the trace and each op of its body becomes one
*logical* op with a repeat count (`OpRecord.repeats`; `OpRecord.step` numbers the iteration).
Views that count ops (ratios by count, op counts, sync points) count the first iteration only;
bytes and FLOPs still add up over every iteration.

A loop is a run of ``period`` consecutive records repeated back to back exactly ``seq_len`` or
``seq_len - 1`` times, with equal signatures (op, module, kind, reason, shapes, mixed axes, data
path): the step's ops see per-position slices, so their shapes do not depend on the step. The
first step may differ (Mamba's starts from a zero state, so its ``deltaA * state`` is a scaling,
S, where later steps multiply two activations, Gray): it then stays as ordinary ops and the loop
has ``seq_len - 1`` steps; either way the logical count does not depend on the length. Requiring
that many repeats keeps ordinary repeated ops (two equal views in a row) and the layers
themselves (other module paths) out of it.
"""

from __future__ import annotations

from .records import OpRecord

# The longest loop body looked for, in records (Mamba's scan step has 6).
MAX_PERIOD = 64


def _signatures(records: list[OpRecord]) -> list[int]:
    """One small integer per distinct record signature, so runs compare as C-level list slices."""
    ids: dict[tuple, int] = {}
    found = []
    for record in records:
        key = (record.op, record.module_path, record.kind, record.reason, record.input_shapes,
               record.output_shapes, record.mixes, record.data_path)
        found.append(ids.setdefault(key, len(ids)))
    return found


def _repeats(signatures: list[int], start: int, period: int) -> int:
    """How many times the ``period`` records from ``start`` repeat back to back (at least 1)."""
    body = signatures[start:start + period]
    count = 1
    while signatures[start + count * period:start + (count + 1) * period] == body:
        count += 1
    return count


def _loop_at(signatures: list[int], start: int, seq_len: int, next_same: list) -> tuple[int, int] | None:
    """(period, steps) of a loop over the sequence starting at ``start``, the shortest period first."""
    candidate = next_same[start]
    while candidate is not None and candidate - start <= MAX_PERIOD:
        steps = _repeats(signatures, start, candidate - start)
        if steps in (seq_len - 1, seq_len):
            return candidate - start, steps
        candidate = next_same[candidate]
    return None


def _next_occurrences(signatures: list[int]) -> list[int | None]:
    following: list[int | None] = [None] * len(signatures)
    last_seen: dict[int, int] = {}
    for position in range(len(signatures) - 1, -1, -1):
        following[position] = last_seen.get(signatures[position])
        last_seen[signatures[position]] = position
    return following


def group_sequence_loops(records: list[OpRecord], seq_len: int) -> list[tuple[int, int, int]]:
    """Mark every loop over the sequence in ``records`` (in place); return (first index, period,
    steps) per loop found."""
    if seq_len < 3:
        return []
    signatures = _signatures(records)
    next_same = _next_occurrences(signatures)
    loops = []
    position = 0
    while position < len(records):
        found = _loop_at(signatures, position, seq_len, next_same)
        if found is None:
            position += 1
            continue
        period, steps = found
        for offset in range(period * steps):
            record = records[position + offset]
            record.repeats, record.step = steps, offset // period
        loops.append((records[position].index, period, steps))
        position += period * steps
    return loops
