"""Where and when a benchmark ran: the fields every results file and BENCHMARKS.md row carries."""

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def provenance() -> dict:
    """Date (UTC), git commit, device and library versions of this run."""
    from hf_bwsk.env import device_description, versions

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "device": device_description(),
        "versions": versions(),
    }
