"""torch.compile (TrainingArguments.torch_compile) with the reversible mode: it trains, at conventional losses."""

import pytest
import torch
from grad_compare import assert_tensors_close
from test_trainer import train
from tiny_models import tiny_model


@pytest.mark.slow
def test_reversible_trains_under_torch_compile_with_conventional_losses(tmp_path):
    _, conventional = train("gpt_neox", tmp_path / "conventional", mode="conventional", steps=16)
    with pytest.warns(UserWarning, match="runs its plan per-op, not scoped: the forward is compiled") as caught:
        trainer, compiled = train("gpt_neox", tmp_path / "reversible", mode="reversible", steps=16, torch_compile=True)
    assert sum("runs its plan per-op" in str(warning.message) for warning in caught) == 1
    status = trainer.reversible_mode.status()
    assert status["status"] == "active" and status["plan_fidelity"]["plan_misses"] == 0, status
    assert status["execution"] == "per_op" and "torch.compile" in status["execution_reason"], status
    # Inductor fuses and reorders element-wise work, so equal up to float rounding rather than bit for bit.
    assert_tensors_close(torch.tensor(compiled), torch.tensor(conventional), rtol=1e-4, atol=1e-5, name="losses")
    # 16 steps = two epochs over the same 16 samples: the second must fit them better.
    assert sum(compiled[8:]) < sum(compiled[:8]), f"loss did not fall: {compiled}"
    untrained = tiny_model("gpt_neox")
    unchanged = [name for name, param in trainer.model.named_parameters()
                 if torch.equal(param, untrained.get_parameter(name))]
    assert not unchanged, f"parameters left untouched by training: {unchanged}"
