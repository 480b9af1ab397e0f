"""One run per directory at a time: the run-directory lock (``hf_bwsk.layout.run_lock``).

The process in the way is a real one (``tests/lock_holder.py``, a subprocess holding the lock), so the
refusals, the pid they name and a ``kill -9`` are what a user meets. The runs are the test-size tiny
preset's smallest grid, one variant, in-process.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from hub_server import TOKEN
from tiny_recipe import TEST_PRESETS
from transformers import TrainerCallback

from hf_bwsk.cli import main as cli_main
from hf_bwsk.errors import BWSKError
from hf_bwsk.experiments.args import parse_arguments
from hf_bwsk.experiments.presets import get_preset
from hf_bwsk.experiments.run_dir import RunDirectory
from hf_bwsk.layout import LOCK, MARKER, read_marker, run_lock
from hf_bwsk.recipe import main, run_experiment

HOLDER = Path(__file__).parent / "lock_holder.py"
ONE_VARIANT = ("--modes", "conventional", "--experiments", "scratch", "--disable_tqdm", "true")
IN_USE = "(a run writing it or a push reading it); wait for that process to end, or stop it, then run this again"

# huggingface_hub's LFS upload hands httpx2 a file object through ``data=``; httpx2 asks for ``content=``.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning:httpx2")


def start_holder(run_dir: Path) -> subprocess.Popen:
    """A live process holding ``run_dir``'s lock (it returns once the lock is held)."""
    process = subprocess.Popen([sys.executable, str(HOLDER), str(run_dir)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=os.environ)
    assert process.stdout.readline() == "locked\n", "the holder did not take the lock"
    return process


@contextmanager
def held(run_dir: Path):
    """``run_dir``'s lock held by another process for the block; then it releases and exits."""
    process = start_holder(run_dir)
    try:
        yield process
    finally:
        process.stdin.close()
        assert process.wait(timeout=30) == 0


def snapshot(directory: Path) -> dict:
    """Every entry below ``directory``: a file's bytes and modification time, a folder as None."""
    return {path.relative_to(directory).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
            if path.is_file() else None for path in sorted(directory.rglob("*"))}


def run(out: Path, *flags, callbacks=()):
    args, training_args = parse_arguments(TEST_PRESETS, ["--output_dir", str(out), *ONE_VARIANT, *flags])
    return run_experiment(get_preset(TEST_PRESETS, args.preset), args, training_args, callbacks=callbacks)


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_pid_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    run_dir = RunDirectory(out)
    run_dir.prepare({"recipe": "pythia-tiny", "preset": "tiny", "seed": 42}, overwrite=False)  # a run's marker,
    ours = out / "scratch-conventional" / "model.safetensors"
    ours.parent.mkdir()
    ours.write_bytes(b"weights")
    run_dir.record([ours])  # a file it wrote,
    (out / "notes.txt").write_text("mine")  # and one of the user's
    with held(out) as holder:
        before = snapshot(out)
        assert json.loads((out / LOCK).read_text())["pid"] == holder.pid, "the holder's pid is in the lock file"
        for flags in (["--overwrite_output_dir", "true"], ["--resume", "true"], []):
            with pytest.raises(SystemExit) as stop:
                main(TEST_PRESETS, ["--output_dir", str(out), *ONE_VARIANT, *flags])
            err = capsys.readouterr().err
            assert stop.value.code == 2 and err.count("\n") == 1, err
            assert err.startswith(f"error: {out} is in use by pid {holder.pid} on ") and IN_USE in err, err
            assert snapshot(out) == before, f"a run refused with {flags} changed the directory"
    assert sorted(path.name for path in out.iterdir()) == [MARKER, "notes.txt", "scratch-conventional"], (
        "the holder's lock file goes with its release")


def test_push_and_card_on_a_run_directory_in_use_are_refused_before_any_request(fake_run_dir, hf_home, hub,
                                                                                 monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push = ["push", str(fake_run_dir), "--repo-id", "tester/in-use"]
    with held(fake_run_dir) as holder:
        before = snapshot(fake_run_dir)
        for command in (push, [*push, "--dry-run"], ["card", str(fake_run_dir)]):
            code = cli_main(command)
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert code == 2 and captured.out == "" and len(lines) == 1, captured
            assert lines[0].startswith(f"hf-bwsk: error: {fake_run_dir} is in use by pid {holder.pid} on "), lines
            assert IN_USE in lines[0]
        assert hub.state.requests == [], "nothing may reach the Hub"
        assert snapshot(fake_run_dir) == before
    assert cli_main([*push, "--dry-run"]) == 0, "once the holder is gone the push goes ahead"
    assert not (fake_run_dir / LOCK).exists()


class StopAfterFirstCheckpoint(TrainerCallback):
    """Interrupts the run once its first checkpoint is saved (and booked), as a kill would."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"interrupted at step {state.global_step}")


def test_a_lock_left_by_a_killed_process_does_not_block_resume(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(out, callbacks=(StopAfterFirstCheckpoint(),))
    holder = start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid, "the dead holder's lock file is left behind"
    results = run(out, "--resume", "true")
    assert [record["variant"] for record in results["runs"]] == ["scratch-conventional"]
    assert results["runs"][0]["resumed"] is True, "the resumed run continued from the checkpoint"
    assert not (out / LOCK).exists()


def test_a_leftover_lock_file_is_neither_foreign_nor_ours(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999_999_999, "host": "gone", "since": "then"}))
    run_dir = RunDirectory(tmp_path)
    run_dir.check({}, resume=False, overwrite=False)  # a directory holding only a lock file is empty
    run_dir.prepare({}, overwrite=False)
    run_dir.record([tmp_path / LOCK])
    assert read_marker(tmp_path)["written"] == [], "the lock file never enters the manifest"
    (tmp_path / MARKER).write_text(json.dumps({"identity": {}, "written": [LOCK]}))  # a hand-edited manifest
    run_dir.prepare({}, overwrite=True)
    assert (tmp_path / LOCK).is_file(), "overwriting never deletes the lock file"
    with run_dir.lock():
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid(), "the new holder's record replaces it"


def test_the_lock_is_reentrant_in_one_thread_and_refuses_another(fake_run_dir):
    from hf_bwsk.publishing.hub import push

    refusals = []

    def other_thread():
        try:
            with run_lock(fake_run_dir):
                refusals.append(None)
        except BWSKError as error:
            refusals.append(str(error))

    with run_lock(fake_run_dir):
        assert push(fake_run_dir, "me/run", dry_run=True).files, "a run's own push reads its directory"
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert (fake_run_dir / LOCK).is_file(), "the inner release keeps the outer hold"
    assert len(refusals) == 1 and f"is in use by pid {os.getpid()} on " in (refusals[0] or ""), refusals
    assert not (fake_run_dir / LOCK).exists()
