"""Recognising the batch, sequence and hidden axes in traced shapes, by size.

A trace at batch size b and sequence length s shows dims such as b, s, b*s (flattened tokens) or
b*heads. If b and s are distinct primes that divide none of the model's own sizes (config integers,
parameter and buffer dims), then no product or quotient of model sizes is divisible by b or s, so a
dim carries the batch axis exactly when b divides it, the sequence axis exactly when s divides it,
and a feature ("hidden") axis when something else is left. Sizes built by addition (a convolution's
padded length s + k - 1) are not recognised; see docs/ANALYSIS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

BATCH, SEQUENCE, HIDDEN = "batch", "sequence", "hidden"
AXES = (BATCH, SEQUENCE, HIDDEN)

# The smallest probes keep the traced forward cheap (a reference scan runs one step per position).
_FIRST_BATCH_PROBE = 3
_FIRST_SEQUENCE_PROBE = 17


@dataclass(frozen=True)
class AxisSizes:
    """The traced batch size and sequence length, and the axes a dim of a given size carries."""

    batch: int
    sequence: int
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def axes_of(self, size: int) -> frozenset:
        found = self._cache.get(size)
        if found is None:
            found = self._cache[size] = self._compute(size)
        return found

    def _compute(self, size: int) -> frozenset:
        axes, rest = set(), size
        if self.batch > 1 and rest % self.batch == 0:
            axes.add(BATCH)
            while rest % self.batch == 0:
                rest //= self.batch
        if self.sequence > 1 and rest % self.sequence == 0:
            axes.add(SEQUENCE)
            while rest % self.sequence == 0:
                rest //= self.sequence
        if rest > 1:
            axes.add(HIDDEN)
        return frozenset(axes)


def model_sizes(model: torch.nn.Module) -> set[int]:
    """Every size the model brings by itself: integers of its config and dims of its tensors."""
    sizes = set(_config_integers(model.config.to_dict()))
    for tensor in (*model.parameters(), *model.buffers()):
        sizes.update(tensor.shape)
    return {size for size in sizes if size > 1}


def _config_integers(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [abs(value)]
    if isinstance(value, dict):
        return [number for item in value.values() for number in _config_integers(item)]
    if isinstance(value, (list, tuple)):
        return [number for item in value for number in _config_integers(item)]
    return []


def identifies_axes(batch: int, sequence: int, sizes: set[int]) -> bool:
    """Whether a trace at (batch, sequence) lets `AxisSizes` tell the axes apart (see module doc)."""
    return (
        batch != sequence
        and all(_is_prime(probe) and all(size % probe for size in sizes) for probe in (batch, sequence))
    )


def probe_sizes(sizes: set[int]) -> AxisSizes:
    """The smallest batch and sequence probes that identify the axes of a model with these sizes."""
    batch = _next_probe(_FIRST_BATCH_PROBE, sizes, exclude=0)
    sequence = _next_probe(_FIRST_SEQUENCE_PROBE, sizes, exclude=batch)
    return AxisSizes(batch, sequence)


def identifying_sizes(batch: int, sequence: int, sizes: set[int]) -> AxisSizes:
    """The smallest batch >= ``batch`` and length >= ``sequence`` that identify the axes (distinct
    primes dividing no model size): one trace then serves the S/K tables and the CALM report."""
    batch = _next_probe(max(batch, 2), sizes, exclude=0)
    return AxisSizes(batch, _next_probe(max(sequence, 2), sizes, exclude=batch))


def _next_probe(start: int, sizes: set[int], exclude: int) -> int:
    candidate = start
    while candidate == exclude or not _is_prime(candidate) or any(size % candidate == 0 for size in sizes):
        candidate += 1
    return candidate


@lru_cache(maxsize=None)
def _is_prime(number: int) -> bool:
    return number > 1 and all(number % divisor for divisor in range(2, int(number**0.5) + 1))
