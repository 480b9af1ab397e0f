"""The publishing layer: ``results.json`` and its tables, the repo card and plots, and the Hub push."""

from .cards import card_files, render_card, write_card
from .hub import assemble, check_repo_id, check_token, push
from .results import assemble_results, format_tables
from .run import Run, load_run

__all__ = [
    "Run", "assemble", "assemble_results", "card_files", "check_repo_id", "check_token", "format_tables", "load_run",
    "push", "render_card", "write_card",
]
