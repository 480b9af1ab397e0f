"""Where a model's configuration comes from: built-in names (offline), local directories, Hub ids.

Only configurations are loaded here, never weights: the analysis builds models on the meta device.
"""

import json
import os
import re
from pathlib import Path

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..config_source import DIRECTORY, local_config_source
from ..errors import BWSKError

BUILTIN_MODELS = {
    "pythia-70m": "EleutherAI/pythia-70m",
    "mamba-130m": "state-spaces/mamba-130m-hf",
    "gpt2": "openai-community/gpt2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "opt-125m": "facebook/opt-125m",
}
"""Built-in name -> the Hub id whose ``config.json`` is shipped in ``hf_bwsk/configs/<name>.json``."""


# A Hub id is exactly "owner/name"; anything else with a separator is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_config(name_or_dir_or_hub_id: str | os.PathLike) -> PretrainedConfig:
    """The configuration of a causal LM, from a built-in name, a local directory or a Hub id.

    Resolution order: an existing local path, then a built-in name (offline, shipped with the
    package), then an ``owner/name`` Hub id (its ``config.json`` only). A bare word that is none of
    these is taken for a mistyped built-in name, so the error lists the known names.

    Raises:
        BWSKError: for an unknown name, a missing directory, a directory without ``config.json``,
            an unreachable Hub, or a model type that is not a causal LM.
    """
    source = str(name_or_dir_or_hub_id)
    local = local_config_source(source)
    if local is not None:
        kind, path = local
        config = _from_directory(path) if kind == DIRECTORY else _from_builtin(source, path)
    elif _HUB_ID.match(source) and not source.startswith((".", "~")):
        config = _from_hub(source)
    elif "/" in source or os.sep in source or source.startswith((".", "~")):
        raise BWSKError(
            f"directory '{source}' does not exist; pass an existing model directory (with a config.json), "
            f"a built-in name ({_known_names()}) or a Hub id 'owner/name'"
        )
    else:
        raise BWSKError(
            f"unknown built-in model '{source}'; use one of {_known_names()}, "
            "a local model directory, or a Hub id 'owner/name'"
        )
    check_causal_lm(config)
    return config


def check_causal_lm(config: PretrainedConfig) -> None:
    """Raise a one-line ``BWSKError`` unless ``config`` describes a decoder-only causal LM.

    The test is transformers' own ``AutoModelForCausalLM`` mapping, minus encoder-decoder models.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.is_encoder_decoder:
        raise BWSKError(
            f"model type '{model_type}' is not a decoder-only causal LM (AutoModelForCausalLM); "
            f"pass a causal LM such as {_known_names()}"
        )


def _from_builtin(name: str, config_file: Path) -> PretrainedConfig:
    raw = json.loads(config_file.read_text())
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    # Record where the hyperparameters come from, as from_pretrained would.
    config.name_or_path = BUILTIN_MODELS[name]
    return config


def _from_directory(path: Path) -> PretrainedConfig:
    if not path.is_dir():
        raise BWSKError(f"'{path}' is a file; pass the model directory that holds its config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BWSKError(
            f"directory '{path}' has no config.json; pass a directory written by save_pretrained "
            "(or copy the model's config.json into it)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise BWSKError(f"'{config_file}' is not valid JSON ({error}); fix or re-save the file") from error
    if model_type not in CONFIG_MAPPING:
        raise BWSKError(
            f"'{config_file}' has model_type {model_type!r}, unknown to transformers; "
            "set model_type to a transformers causal-LM type (e.g. 'gpt_neox', 'llama')"
        )
    return AutoConfig.from_pretrained(path)


def _from_hub(hub_id: str) -> PretrainedConfig:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return AutoConfig.from_pretrained(hub_id)
    except OSError as error:
        causes = _cause_chain(error)
        # LocalEntryNotFoundError subclasses EntryNotFoundError: test it first.
        if any(isinstance(cause, LocalEntryNotFoundError) for cause in causes):
            raise BWSKError(
                f"could not reach the Hugging Face Hub for '{hub_id}'; "
                f"a built-in name ({_known_names()}) or a local directory works offline"
            ) from error
        if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
            raise BWSKError(
                f"no model '{hub_id}' on the Hugging Face Hub; check the id, or log in "
                "(`hf auth login`) if it is private or gated"
            ) from error
        if any(isinstance(cause, EntryNotFoundError) for cause in causes):
            raise BWSKError(
                f"the Hub repository '{hub_id}' has no config.json; pass a transformers model repository"
            ) from error
        raise


def _cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def _known_names() -> str:
    return ", ".join(BUILTIN_MODELS)
