"""A finished run directory read back once: ``results.json``, each variant's record and the files it publishes.

Everything that publishes a run (cards, plots, ``assemble``, ``push``) works from one ``Run``, so a
push reads and checks the directory once.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BWSKError
from ..layout import (
    EXPERIMENTS,
    MODES,
    RESULTS,
    TRAINING_RESULTS,
    VARIANTS,
    read_json,
    variant_name,
)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MODEL_FILES = ("config.json", "generation_config.json", TRAINING_RESULTS)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
REQUIRED_FILES = ("config.json", TRAINING_RESULTS, "tokenizer_config.json")


@dataclass(frozen=True)
class Run:
    """A run directory read back: ``results.json``, each variant's ``training_results.json`` and files."""

    run_dir: Path
    results: dict
    variants: dict  # folder name -> training_results, in VARIANTS order
    files: dict  # folder name -> the files it publishes, sorted by name

    @property
    def slug(self) -> str:
        return self.results["slug"]

    def variant(self, experiment: str, mode: str) -> dict:
        return self.variants[variant_name(experiment, mode)]


def load_run(run_dir: "str | Path | Run") -> Run:
    """Read and check a run directory in the experiment runner's layout (a ``Run`` is returned as is).

    Refuses, in one line naming the variant, a missing, incomplete or mislabelled variant.
    """
    if isinstance(run_dir, Run):
        return run_dir
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BWSKError(f"run directory {run_dir} does not exist; pass the output_dir of an experiment run")
    results = read_json(run_dir / RESULTS, "pass the output_dir the experiment runner wrote")
    variants = {}
    for experiment in EXPERIMENTS:
        for mode in MODES:
            folder = variant_name(experiment, mode)
            record = read_json(run_dir / folder / TRAINING_RESULTS,
                               f"variant {folder} is incomplete; finish or re-run it before publishing")
            if (record.get("experiment"), record.get("mode")) != (experiment, mode):
                raise BWSKError(
                    f"{run_dir / folder / TRAINING_RESULTS} describes experiment={record.get('experiment')}"
                    f" mode={record.get('mode')}, not the folder {folder}; move it to its own folder"
                )
            variants[folder] = record
    files = {variant: variant_files(run_dir / variant) for variant in VARIANTS}
    return Run(run_dir, results, variants, files)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise BWSKError(f"{path} is not a readable safetensors file ({error}); re-save the variant") from error


def variant_files(folder: str | Path) -> list[Path]:
    """The files one variant folder publishes, after checking it is complete; refuses naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BWSKError(f"variant {folder.name} is missing ({folder}); train it before publishing")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise BWSKError(f"variant {folder.name} is incomplete: {', '.join(missing)} missing in {folder}")
    if (folder / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        weights = [folder / WEIGHTS_INDEX] + [folder / shard for shard in shards]
        absent = [path.name for path in weights if not path.is_file()]
        if absent:
            raise BWSKError(f"variant {folder.name} is incomplete: shards {', '.join(absent)} missing in {folder}")
    elif (folder / WEIGHTS).is_file():
        weights = [folder / WEIGHTS]
    else:
        raise BWSKError(
            f"variant {folder.name} has no {WEIGHTS} in {folder}; save it with save_pretrained() "
            "(safetensors is the only weight format published)"
        )
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    extras = [folder / name for name in MODEL_FILES + TOKENIZER_FILES if (folder / name).is_file()]
    return sorted(weights + extras, key=lambda path: path.name)


def unpublishable(run: Run) -> str | None:
    """Why the run should not be published as is: its diverged variants and the variants whose
    weights hold NaN or infinity (None when there is nothing to say)."""
    problems = [f"{folder} diverged at step {record['diverged']['step']}"
                for folder, record in run.variants.items() if record.get("diverged")]
    problems += [f"{folder} has non-finite weights ({tensor})" for folder, tensor in _non_finite_weights(run)]
    return "; ".join(problems) or None


def _non_finite_weights(run: Run):
    """(variant, first tensor holding NaN or inf) for each variant whose safetensors weights have one."""
    import torch
    from safetensors import safe_open

    for folder, paths in run.files.items():
        for path in (path for path in paths if path.suffix == ".safetensors"):
            with safe_open(path, framework="pt") as weights:
                bad = next((name for name in weights.keys()
                            if not torch.isfinite(weights.get_tensor(name)).all()), None)
            if bad is not None:
                yield folder, bad
                break
