"""The rules for writing into an experiment's output directory (its layout: :mod:`hf_bwsk.layout`).

A variant folder appears only complete: it is written under a hidden ``.partial`` name and
renamed. The marker tells our directories from foreign ones, which are refused unless the user
asks to overwrite.
"""

import json
import os
import shutil
from pathlib import Path

from ..errors import BWSKError
from ..layout import (
    CHECKPOINTS,
    MARKER,
    PARTIAL_SUFFIX,
    RESULTS,
    TRAINING_RESULTS,
    VARIANTS,
    write_json,
)


class RunDirectory:
    """An experiment's output directory (layout: :mod:`hf_bwsk.layout`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def variant(self, name: str) -> Path:
        return self.path / name

    def partial(self, name: str) -> Path:
        return self.path / f".{name}{PARTIAL_SUFFIX}"

    def finished(self, name: str) -> bool:
        """Whether the variant folder is complete (it only ever appears complete)."""
        return (self.variant(name) / TRAINING_RESULTS).is_file()

    def check(self, identity: dict, *, resume: bool, overwrite: bool) -> None:
        """Refuse a directory we may not write into; read-only, so every process can run it.

        ``identity`` (recipe, preset, seed, ...) must match the marker's to resume a run.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise BWSKError(f"--output_dir {self.path} is a file; pass a directory")
        marker = self.path / MARKER
        if not marker.is_file():
            foreign = sorted(entry.name for entry in self.path.iterdir())
            if foreign and not overwrite:
                listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise BWSKError(
                    f"--output_dir {self.path} holds files this runner did not write ({listed}); "
                    "pass an empty or new directory, or --overwrite_output_dir to write beside them"
                )
            return
        if overwrite:
            return
        if not resume:
            raise BWSKError(
                f"--output_dir {self.path} holds an earlier run; pass --resume to continue it "
                "or --overwrite_output_dir to start over"
            )
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded != identity:
            raise BWSKError(
                f"--output_dir {self.path} holds a run of {recorded}, not {identity}; "
                "resume with the same settings, or choose another --output_dir"
            )

    def prepare(self, identity: dict, *, overwrite: bool) -> None:
        """Make the directory ready (main process only, after :meth:`check`).

        Overwriting removes only what this runner writes; leftovers of an interrupted variant
        write (``.partial`` folders) are always removed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        ours = [self.results_path, self.checkpoints, *(self.variant(name) for name in VARIANTS)]
        for path in [*self.path.glob(f".*{PARTIAL_SUFFIX}"), *(ours if overwrite else ())]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        write_json(self.path / MARKER, identity)

    def publish(self, name: str) -> Path:
        """Rename the complete ``.partial`` folder of variant ``name`` to its final name."""
        final = self.variant(name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.partial(name), final)
        return final

