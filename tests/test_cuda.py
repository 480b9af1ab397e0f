"""On a CUDA device: the reversible mode's loss and every gradient equal conventional's, and the fused
loss equals HF's at a realistic shape, per precision (marker ``cuda``; skipped without CUDA).

``python benchmarks/gpu.py --out DIR`` runs these first (``pytest -m cuda tests/test_cuda.py``). Only
torch, transformers, accelerate and peft are needed: no datasets, evaluate or Hub access. Mamba runs
its reference path here (the mamba-ssm kernels are neither installed nor fetched from the Hub).
"""

import pytest
import torch
from grad_compare import (
    assert_grads_close,
    assert_grads_relatively_close,
    assert_named_grads_relatively_close,
    assert_tensors_close,
)
from tiny_models import tiny_batch, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_bwsk.analysis import find_decoder_layers
from hf_bwsk.memory import ReversibleMode, fused_linear_cross_entropy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (python benchmarks/gpu.py runs these)"),
]
DEVICE = torch.device("cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Low precision: entries round differently along the two paths' op orders (the fused loss sums the
# head gradient over chunks in fp32), so each gradient is compared as a whole, relative to its norm.
RELATIVE_GRAD_ERROR = {"bf16": 3e-2, "fp16": 1e-2}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32: fp32 matmuls and convolutions (Mamba's conv1d) in full precision, as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(precision):
    return torch.autocast("cuda", dtype=DTYPES[precision], enabled=precision != "fp32")


def on_device(batch):
    return {key: value.to(DEVICE) for key, value in batch.items()}


def padded_batch(seq_len=40):
    """Two rows, the second right-padded: masked positions and ignore_index labels."""
    batch = tiny_batch(2, seq_len, seed=3)
    batch["attention_mask"][1, -5:] = 0
    batch["labels"][1, -5:] = -100
    return on_device(batch)


def lora(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # non-zero B: every LoRA weight gets a gradient
    return peft.get_peft_model(model, config)


def model_pair(arch, attn_implementation="eager"):
    """Two identical tiny models on the GPU in training mode; ``llama_lora`` is a PEFT LoRA llama."""
    def build():
        torch.manual_seed(0)
        if arch == "llama_lora":
            return lora(tiny_model("llama"))
        return AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn_implementation)

    return [build().to(DEVICE).train() for _ in range(2)]


def reversible(model, batch, precision):
    """``model`` (its base model for PEFT) switched to the reversible mode, set up on ``batch``."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    mode = ReversibleMode(target, find_layers=find_decoder_layers, loss_chunk_size=24)
    mode.install_forward()
    with autocast(precision):
        status = mode.setup(batch)
    assert status["status"] == "active", status
    return mode


def loss_with_grads(model, batch, precision):
    model.zero_grad(set_to_none=True)
    with autocast(precision):
        output = model(**batch)
    output.loss.backward()
    return output


def assert_reversible_equals_conventional(conventional, model, batch, precision):
    expected = loss_with_grads(conventional, batch, precision)
    actual = loss_with_grads(model, batch, precision)
    assert actual.logits is None, "the fused loss must not materialise logits"
    tolerance = LOSS_TOLERANCE[precision]
    assert_tensors_close(actual.loss, expected.loss, rtol=tolerance, atol=tolerance, name=f"{precision} loss")
    if precision == "fp32":
        # cuBLAS picks kernels per shape and the loss sums over chunks: agreement to float rounding.
        assert_grads_close(model, conventional, rtol=1e-4, atol=1e-5)
    else:
        assert_grads_relatively_close(model, conventional, RELATIVE_GRAD_ERROR[precision])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "mamba", "llama_lora"])
def test_loss_and_every_gradient_equal_conventional(arch, precision):
    conventional, model = model_pair(arch)
    batch = padded_batch()
    mode = reversible(model, batch, precision)
    assert_reversible_equals_conventional(conventional, model, batch, precision)
    mode.teardown()


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_sdpa_backends_loss_and_every_gradient_equal_conventional(arch, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    conventional, model = model_pair(arch, attn_implementation="sdpa")
    # Flash attention takes no explicit mask (HF passes none for an unpadded causal batch) and
    # runs in half precision only: bf16 autocast for both backends.
    batch = on_device(tiny_batch(2, 40, seed=3)) if backend == "FLASH_ATTENTION" else padded_batch()
    with sdpa_kernel(getattr(SDPBackend, backend)):  # the only backend allowed: it runs, or the test fails
        mode = reversible(model, batch, "bf16")
        assert_reversible_equals_conventional(conventional, model, batch, "bf16")
    mode.teardown()


class GradRecorder(TrainerCallback):
    """The gradients the optimizer is about to apply, per step (unscaled by the grad scaler's clipping)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({name: None if param.grad is None else param.grad.detach().double().cpu()
                           for name, param in model.named_parameters()})


def train_fp16(arch, mode, output_dir, steps=4):
    """BWSKTrainer with ``fp16=True`` on the GPU: (trainer, per-step losses, per-step gradients)."""
    from hf_bwsk.training.args import BWSKTrainingArguments
    from hf_bwsk.training.trainer import BWSKTrainer

    rows = [{key: value[0] for key, value in tiny_batch(1, 16, seed=i).items()} for i in range(16)]
    args = BWSKTrainingArguments(
        output_dir=str(output_dir), bwsk_mode=mode, fp16=True, max_steps=steps, per_device_train_batch_size=2,
        logging_steps=1, learning_rate=3e-3, seed=0, report_to=[], save_strategy="no", disable_tqdm=True,
        bwsk_loss_chunk_size=20, bwsk_analysis_seq_len=8,
    )
    recorder = GradRecorder()
    trainer = BWSKTrainer(model=tiny_model(arch), args=args, train_dataset=rows, callbacks=[recorder])
    trainer.train()
    assert trainer.accelerator.scaler is not None, "fp16=True must train with the grad scaler"
    return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log], recorder.grads


def _finite(grads):
    return all(grad is None or bool(grad.isfinite().all()) for grad in grads.values())


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "mamba"])
def test_fp16_trainer_with_grad_scaler_equals_conventional(tmp_path, arch):
    _, conventional_losses, conventional_grads = train_fp16(arch, "conventional", tmp_path / "conventional")
    trainer, losses, grads = train_fp16(arch, "reversible", tmp_path / "reversible")
    assert trainer.reversible_mode.status()["status"] == "active"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(conventional_losses), rtol=1e-2, atol=1e-2)
    # A step the scaler skips (inf/nan at the current scale) changes no weight and must skip on both sides.
    # So at the first step it applies the weights are still identical: its gradients must agree.
    # (Later steps start from weights that differ by fp16 rounding; the losses above cover them.)
    assert [_finite(g) for g in grads] == [_finite(g) for g in conventional_grads], "the scaler skipped different steps"
    first_applied = next((i for i, step_grads in enumerate(grads) if _finite(step_grads)), None)
    assert first_applied is not None, "every step overflowed: no gradient to compare"
    assert_named_grads_relatively_close(grads[first_applied], conventional_grads[first_applied],
                                        RELATIVE_GRAD_ERROR["fp16"])


# (tensor dtype, autocast dtype, loss scale, tolerance class): fp32; pure bf16 weights; the AMP cases, fp32
# master weights under autocast, fp16 with the grad scaler's initial scale (unscaled, its gradients would
# underflow fp16: softmax / 16,384 tokens).
FUSED_LOSS_CASES = {
    "fp32": (torch.float32, None, 1.0, "fp32"),
    "bf16": (torch.bfloat16, None, 1.0, "bf16"),
    "bf16_autocast": (torch.float32, torch.bfloat16, 1.0, "bf16"),
    "fp16_autocast_scaled": (torch.float32, torch.float16, 65536.0, "fp16"),
}


@pytest.mark.parametrize("case", list(FUSED_LOSS_CASES))
def test_fused_loss_matches_hf_at_8x2048_tokens_and_vocab_128256(case):
    # Llama-3's vocabulary and a 1B model's width. The reference is HF's loss in fp32 on the same
    # (rounded) inputs; in low precision the fused loss must be at least as close to it as HF's own
    # loss in that precision is (or within a quarter of that precision's tolerance).
    dtype, autocast_dtype, scale, precision = FUSED_LOSS_CASES[case]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(8, 2048, 2048, device=DEVICE, generator=generator).to(dtype)
    weight = (0.02 * torch.randn(128_256, 2048, device=DEVICE, generator=generator)).to(dtype)
    labels = torch.randint(0, 128_256, (8, 2048), device=DEVICE, generator=generator)
    labels[:, -64:] = -100

    def loss_and_grads(loss_fn, inputs_dtype, autocast_dtype, scale):
        inputs = [hidden.to(inputs_dtype).detach().requires_grad_(), weight.to(inputs_dtype).detach().requires_grad_()]
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(*inputs)
        grads = torch.autograd.grad(loss * scale, inputs)
        assert all(grad.dtype == inputs_dtype for grad in grads)
        return loss.detach().float(), {"hidden": grads[0].double() / scale, "weight": grads[1].double() / scale}

    def hf(h, w):
        return ForCausalLMLoss(h @ w.t(), labels, vocab_size=128_256)

    def fused(h, w):
        return fused_linear_cross_entropy(h, w, labels)

    reference_loss, reference = loss_and_grads(hf, torch.float32, None, 1.0)
    fused_loss, fused_grads = loss_and_grads(fused, dtype, autocast_dtype, scale)
    tolerance = LOSS_TOLERANCE[precision]
    assert_tensors_close(fused_loss, reference_loss, rtol=tolerance, atol=tolerance, name=f"{case} fused loss")
    if precision == "fp32":
        assert_named_grads_relatively_close(fused_grads, reference, 1e-4)
        return
    hf_loss, hf_grads = loss_and_grads(hf, dtype, autocast_dtype, scale)
    assert_tensors_close(fused_loss, hf_loss, rtol=tolerance, atol=tolerance, name=f"{case} fused vs HF loss")
    for name in fused_grads:
        hf_error = _relative_error(hf_grads[name], reference[name])
        allowed = max(1.5 * hf_error, RELATIVE_GRAD_ERROR[precision] / 4)
        assert_named_grads_relatively_close({name: fused_grads[name]}, {name: reference[name]}, allowed)


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()
