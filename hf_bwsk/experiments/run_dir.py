"""The rules for writing into an experiment's output directory (its layout: :mod:`hf_bwsk.layout`).

A variant folder appears only complete: it is written under a hidden ``.partial`` name and its
files moved in, ``training_results.json`` last. The marker tells our directories from foreign ones
and lists every file we wrote (the manifest): overwriting deletes those files and nothing else, so
files the user put anywhere in the directory survive. A run holds the directory's lock
(:meth:`RunDirectory.lock`) throughout; the lock file is neither ours to delete nor foreign.
"""

import json
import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

from ..errors import BWSKError
from ..layout import (
    CHECKPOINTS,
    LOCK,
    MARKER,
    PARTIAL_SUFFIX,
    RESULTS,
    TRAINING_RESULTS,
    VARIANTS,
    files_under,
    read_marker,
    record_written,
    run_lock,
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
        """Whether the variant folder is complete (its record is the last file moved in)."""
        return (self.variant(name) / TRAINING_RESULTS).is_file()

    def lock(self) -> AbstractContextManager[None]:
        """Hold the directory's lock (:func:`hf_bwsk.layout.run_lock`), making the directory if needed;
        refuses, naming the holder's pid, a directory another run or push holds (main process only)."""
        self._refuse_file()
        return run_lock(self.path, create=True)

    def check(self, identity: dict, *, resume: bool, overwrite: bool) -> None:
        """Refuse a directory we may not write into; read-only, so every process can run it.

        ``identity`` (recipe, preset, seed, every effective hyperparameter) must match the marker's
        to resume a run.
        """
        if not self.path.exists():
            return
        self._refuse_file()
        if not (self.path / MARKER).is_file():
            # The lock file is the lock's (ours while we run, or a killed run's), not the user's.
            foreign = sorted(entry.name for entry in self.path.iterdir() if entry.name != LOCK)
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
        differences = identity_differences(read_marker(self.path)["identity"], identity)
        if differences:
            raise BWSKError(
                f"--resume with other settings than the run in {self.path}: {differences}; "
                "resume with the recorded values, or choose another --output_dir"
            )

    def _refuse_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise BWSKError(f"--output_dir {self.path} is a file; pass a directory")

    def prepare(self, identity: dict, *, overwrite: bool) -> None:
        """Make the directory ready (main process only, after :meth:`check` and every other check).

        Overwriting deletes the files the manifest lists, then the folders that left empty; the
        hidden ``.partial`` folders of an interrupted variant are always removed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        written = read_marker(self.path)["written"] if (self.path / MARKER).is_file() else []
        for name in VARIANTS:
            shutil.rmtree(self.partial(name), ignore_errors=True)
        if overwrite:
            _delete_files(self.path, written)
            written = []
        write_json(self.path / MARKER, {"identity": identity, "written": written})

    def record(self, paths) -> None:
        """Add files we wrote to the manifest (main process only)."""
        record_written(self.path, paths)

    def publish(self, name: str) -> Path:
        """Move the complete ``.partial`` folder's files into variant ``name``'s folder, its record
        last; files already there that we did not write stay."""
        partial, final = self.partial(name), self.variant(name)
        files = sorted(files_under(partial), key=lambda path: path.name == TRAINING_RESULTS)
        targets = [final / path.relative_to(partial) for path in files]
        self.record(targets)  # recorded first: an interruption leaves nothing of ours unlisted
        for source, target in zip(files, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        shutil.rmtree(partial)
        return final


def identity_differences(recorded: dict, current: dict) -> str:
    """The keys whose values differ, each with both values, e.g. ``learning_rate 0.1 (run) vs 1.0 (now)``."""
    keys = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
    return ", ".join(f"{key} {json.dumps(recorded.get(key))} (run) vs {json.dumps(current.get(key))} (now)"
                     for key in keys)


def _delete_files(root: Path, written: list[str]) -> None:
    """Delete the listed files under ``root``, then every folder of theirs left empty (deepest first)."""
    folders = set()
    for relative in written:
        if relative == LOCK:  # never: deleting it mid-run would let a second holder in
            continue
        path = root / relative
        if path.is_file() or path.is_symlink():
            path.unlink()
        folders.update(parent for parent in path.parents if root in parent.parents)
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
