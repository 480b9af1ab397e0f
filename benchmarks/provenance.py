"""Where and when a benchmark ran: the fields every results file and BENCHMARKS.md row carries."""

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


def git_commit() -> str:
    """The short HEAD commit, with ``+uncommitted`` when the code that ran (library, benchmarks) differs from it."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "--", "hf_bwsk", "benchmarks"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    commit = result.stdout.strip() or "unknown"
    return f"{commit}+uncommitted" if changed else commit


def provenance() -> dict:
    """Date (UTC), git commit, device and library versions of this run."""
    from hf_bwsk.env import device_description, versions

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "device": device_description(),
        "versions": versions(),
    }


def append_to_section(section: str, intro: str, lines: list[str], path: Path = BENCHMARKS) -> None:
    """Add ``lines`` at the end of ``section`` of ``path`` (a ``## `` heading; other sections may follow it),
    creating the section with ``intro`` under it first if needed. Earlier runs' rows stay."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n" + (f"\n{intro}\n" if intro else "")
    section_end = text.find("\n## ", text.index(section) + len(section))
    head, tail = (text, "") if section_end < 0 else (text[:section_end], text[section_end:])
    block = "\n".join(lines).strip("\n")
    path.write_text(head.rstrip("\n") + "\n\n" + block + "\n" + tail, encoding="utf-8")
