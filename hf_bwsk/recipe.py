"""The recipes' entry point: train the 3 modes x 2 experiments grid, write ``results.json``, print the
tables, push if asked.

A recipe is a dict of presets plus one call::

    from hf_bwsk.experiments.presets import PYTHIA_PRESETS
    from hf_bwsk.recipe import main

    if __name__ == "__main__":
        main(PYTHIA_PRESETS)

Flags come from :class:`~hf_bwsk.experiments.args.ExperimentArguments` and
:class:`~hf_bwsk.training.BWSKTrainingArguments` (``--help`` lists them all); the chosen preset
supplies the defaults of sizes and learning rates. ``results.json`` is described in
``docs/RESULTS_FORMAT.md``.
"""

import sys
from pathlib import Path

from .errors import BWSKError
from .experiments.args import ExperimentArguments, parse_arguments
from .experiments.presets import Preset, get_preset
from .experiments.runner import lock_output_dir, run_grid
from .layout import RESULTS, write_json
from .publishing.hub import check_repo_id, check_token, push
from .publishing.results import assemble_results, divergence_summary, format_tables
from .training.args import BWSKTrainingArguments

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


def main(presets: dict[str, Preset], args: list[str] | None = None) -> dict | None:
    """Parse flags (or a YAML/JSON file), run the grid, print the tables, push if asked.

    A BWSKError is printed as one line and exits with status 2; a run with a diverged variant
    prints a one-line summary and exits with status 1. Returns the results on the main process.
    """
    try:
        experiment_args, training_args = parse_arguments(presets, args)
        preset = get_preset(presets, experiment_args.preset)
        results = run_experiment(preset, experiment_args, training_args)
    except BWSKError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    if training_args.process_index != 0:
        return None
    output_dir = Path(training_args.output_dir)
    print(format_tables(results))
    print(f"Results: {output_dir / RESULTS}")
    print("Variants: " + ", ".join(str(output_dir / run["variant"]) for run in results["runs"]))
    summary = divergence_summary(results["runs"])
    if summary:
        print(f"error: {summary}" + ("; nothing was pushed" if training_args.push_to_hub else ""), file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED)
    return results


def run_experiment(preset: Preset, args: ExperimentArguments, training_args: BWSKTrainingArguments,
                   *, callbacks: tuple = ()) -> dict:
    """Train the requested variants of ``preset`` and write ``results.json``; return its content.

    ``callbacks`` are added to every variant's trainer. The output directory's lock is held throughout,
    from before the first check to after the push. Every input check happens before training.
    """
    with lock_output_dir(training_args):
        if training_args.push_to_hub:
            _check_push(args, training_args)
        grid_run = run_grid(preset, args, training_args, callbacks=callbacks)
        results = assemble_results(preset=preset, runs=grid_run.runs, **grid_run.provenance)
        if training_args.process_index == 0:
            write_json(grid_run.run_dir.results_path, results)
            grid_run.run_dir.record([grid_run.run_dir.results_path])
            if training_args.push_to_hub and not divergence_summary(results["runs"]):
                push(grid_run.run_dir.path, args.hub_repo_id, private=bool(training_args.hub_private_repo),
                     revision=training_args.hub_revision, token=training_args.hub_token)
    return results


def _check_push(args: ExperimentArguments, training_args: BWSKTrainingArguments) -> None:
    """Refuse a push that would fail after training: no or malformed repo id, missing or rejected token."""
    if not args.hub_repo_id:
        raise BWSKError("--push_to_hub needs --hub_repo_id namespace/name (the six variants go to one repo)")
    check_repo_id(args.hub_repo_id)
    check_token(training_args.hub_token)
