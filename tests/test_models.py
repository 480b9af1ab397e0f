"""Built-in configurations and `load_config`'s resolution of names, directories and Hub ids."""

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import CommitOperationAdd, HfApi
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, T5Config

from hf_bwsk.errors import BWSKError
from hf_bwsk.models import BUILTIN_MODELS, check_causal_lm, load_config

# Parameter counts of the published checkpoints (Hub model pages / DESIGN.md §3).
PUBLISHED_PARAMS = {
    "pythia-70m": ("gpt_neox", 70_426_624),
    "mamba-130m": ("mamba", 129_135_360),
    "gpt2": ("gpt2", 124_439_808),
    "smollm2-135m": ("llama", 134_515_008),
    "opt-125m": ("opt", 125_239_296),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_config_builds_the_published_model_in_fp32(name):
    config = load_config(name)
    model_type, params = PUBLISHED_PARAMS[name]
    assert config.model_type == model_type
    assert config.name_or_path == BUILTIN_MODELS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(parameter.numel() for parameter in model.parameters())
    assert counted == params, f"{name}: {counted:,} parameters, published {params:,}"
    # Shipped configs hold hyperparameters, not the checkpoint's storage dtype.
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_pythia_and_mamba_configs_match_the_design_facts():
    pythia = load_config("pythia-70m")
    assert (pythia.num_hidden_layers, pythia.hidden_size, pythia.num_attention_heads) == (6, 512, 8)
    assert (pythia.vocab_size, pythia.tie_word_embeddings, pythia.use_parallel_residual) == (50_304, False, True)
    # transformers 5 folds rotary_pct / rotary_emb_base into rope_parameters.
    assert pythia.rope_parameters["partial_rotary_factor"] == 0.25
    mamba = load_config("mamba-130m")
    assert (mamba.num_hidden_layers, mamba.hidden_size, mamba.intermediate_size) == (24, 768, 1536)
    assert (mamba.state_size, mamba.conv_kernel, mamba.vocab_size) == (16, 4, 50_280)
    assert mamba.tie_word_embeddings is True


def test_every_shipped_config_file_is_a_builtin_name():
    from hf_bwsk.config_source import CONFIG_DIR

    assert sorted(path.stem for path in CONFIG_DIR.glob("*.json")) == sorted(BUILTIN_MODELS)


def test_local_directory_loads_its_config(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    config = load_config(tmp_path)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_key_value_heads) == (32, 2)


def _error(source) -> str:
    with pytest.raises(BWSKError) as caught:
        load_config(source)
    message = str(caught.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_unknown_builtin_name_lists_the_known_names():
    message = _error("pythia70m")
    assert "unknown built-in model 'pythia70m'" in message
    assert all(name in message for name in BUILTIN_MODELS)


@pytest.mark.parametrize("missing", ["./no-such-model", "runs/x/no-such-model"])
def test_missing_directory(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    message = _error(missing)
    assert f"directory '{missing}' does not exist" in message


def test_directory_without_config(tmp_path):
    message = _error(tmp_path)
    assert "has no config.json" in message and "save_pretrained" in message


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "pass the model directory" in _error(tmp_path / "config.json")


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "is not valid JSON" in _error(tmp_path)


def test_unknown_model_type_in_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    assert "unknown to transformers" in _error(tmp_path)


def test_directory_with_a_model_that_is_not_a_causal_lm(tmp_path):
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path)
    message = _error(tmp_path)
    assert "model type 't5' is not a decoder-only causal LM" in message


def test_check_causal_lm_accepts_every_builtin_and_rejects_encoder_decoder():
    for name in BUILTIN_MODELS:
        check_causal_lm(load_config(name))
    with pytest.raises(BWSKError, match="not a decoder-only causal LM"):
        check_causal_lm(T5Config())


def test_unreachable_hub_says_what_works_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _error("hf-bwsk-tests/no-such-model")
    assert message.startswith("could not reach the Hugging Face Hub for 'hf-bwsk-tests/no-such-model'")
    assert "pythia-70m" in message and "local directory works offline" in message


@pytest.mark.slow
def test_hub_id_loads_the_config_only_and_a_missing_repo_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the test Hub speaks LFS only
    tiny_config("gpt_neox").save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights that must not be downloaded")
    with HubServer({"token": "owner"}) as hub:
        api = HfApi(endpoint=hub.endpoint, token="token")
        api.create_repo("owner/tiny-neox")
        files = [CommitOperationAdd(path.name, str(path)) for path in (tmp_path / "model").iterdir()]
        api.create_commit("owner/tiny-neox", files, commit_message="tiny model")
        # HF_ENDPOINT is read when huggingface_hub is imported: load in a fresh interpreter.
        code = (
            "from hf_bwsk.models import load_config\n"
            "print(load_config('owner/tiny-neox').to_json_string())\n"
            "try:\n    load_config('owner/missing')\nexcept Exception as error:\n    print(repr(error))"
        )
        environment = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"),
                       "HF_HUB_DISABLE_XET": "1"}
        result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 0, result.stderr
    config_json, error = result.stdout.rsplit("}", 1)
    assert json.loads(config_json + "}")["hidden_size"] == tiny_config("gpt_neox").hidden_size
    assert error.strip().startswith("BWSKError(\"no model 'owner/missing' on the Hugging Face Hub")
    cached = sorted(path.name for path in (tmp_path / "hf-home").rglob("*") if path.is_file())
    assert "config.json" in cached and "model.safetensors" not in cached, cached
