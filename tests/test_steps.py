"""Loops over the sequence (a reference scan's per-token steps) counted as logical ops."""

import pytest
from tiny_models import ARCHS, tiny_config

from hf_bwsk.analysis import analyze, calm_report
from hf_bwsk.analysis.steps import group_sequence_loops
from hf_bwsk.models import load_config


def test_mamba_counts_do_not_depend_on_the_sequence_length():
    short, long = (analyze(tiny_config("mamba"), seq_len=n, batch_size=2) for n in (64, 256))
    assert short.ratios("count") == long.ratios("count"), (short.ratios("count"), long.ratios("count"))
    assert short.op_counts() == long.op_counts()
    assert len(long.data_records) > 3 * len(short.data_records), "the trace itself scales with the length"
    # Bytes and FLOPs still add up over every step.
    for by in ("bytes", "flops"):
        assert sum(r.output_bytes if by == "bytes" else r.flops for r in long.data_records) > 3 * sum(
            r.output_bytes if by == "bytes" else r.flops for r in short.data_records), by
    for report in (short, long):
        loops = report.sequence_loops()
        assert len(loops) == report.num_layers, loops
        assert all(loop.steps == report.seq_len - 1 and loop.module_path.endswith("mixer") for loop in loops)


def test_mamba_sync_counts_do_not_depend_on_the_sequence_length():
    # CALM needs lengths that tell the axes apart (primes dividing no model size): 67 and 257.
    short, long = (calm_report(analyze(tiny_config("mamba"), seq_len=n, batch_size=3)) for n in (67, 257))
    assert (short.seq_len, long.seq_len) == (67, 257), "used as traced, not re-traced at probe sizes"
    assert short.sync_counts() == long.sync_counts(), (short.sync_counts(), long.sync_counts())
    for axis in ("sequence", "hidden"):
        assert short.axes[axis].layer_sync_counts == long.axes[axis].layer_sync_counts, axis
    assert short.hidden_plan.layer_collectives() == long.hidden_plan.layer_collectives()


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch != "mamba"])
def test_transformers_have_no_loops(arch):
    report = analyze(tiny_config(arch), seq_len=32)
    assert report.sequence_loops() == []
    assert len(report.logical_records) == len(report.data_records)


def test_a_group_needs_seq_len_repeats():
    report = analyze(tiny_config("mamba"), seq_len=16)
    records = list(report.records)
    for record in records:
        record.repeats, record.step = 1, 0
    assert group_sequence_loops(records, 40) == [], "16 steps are no loop over 40 positions"
    loops = group_sequence_loops(records, 16)
    assert [steps for _, _, steps in loops] == [15, 15]
    assert all(r.step < r.repeats for r in records)


@pytest.mark.slow
def test_mamba_130m_counts_at_64_and_256_tokens():
    config = load_config("mamba-130m")
    short, long = (analyze(config, seq_len=n) for n in (64, 256))
    assert short.ratios("count") == long.ratios("count")
    assert short.summary()["logical_ops"] == long.summary()["logical_ops"] < len(short.data_records) / 5
