"""hf-bwsk: S/K analysis of causal LMs and publishing of experiment runs.

Each subcommand is one function decorated with ``@subcommand(name, help, *arguments)`` and listed in
``SUBCOMMANDS``. Bad input raises ``BWSKError``; the script prints it as one line,
``hf-bwsk: error: <message>``, and exits with code 2 (argparse usage errors too). ``--debug`` adds
the traceback.
"""

import argparse
import base64
import contextlib
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config_source import BUILTIN_NAMES, DIRECTORY, local_config_source
from .errors import BWSKError

EXIT_BAD_INPUT = 2
# The analyze defaults; without --seq-len / --batch-size they are rounded up to sizes that identify the
# axes, so the CALM report needs no second trace.
DEFAULT_SEQ_LEN, DEFAULT_BATCH = 128, 2


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its name, one-line help, argparse arguments and the function that runs it."""

    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict], ...]
    run: Callable[[argparse.Namespace], None]
    # True when ``run`` enters `_library_logs` itself, around its heavy part only (so that an answer
    # from the cache imports no HF library); otherwise `main` enters it around the whole command.
    quiets_own_logs: bool = False


def argument(*flags: str, **options) -> tuple[tuple[str, ...], dict]:
    """The arguments of one ``ArgumentParser.add_argument`` call, for ``@subcommand``."""
    return flags, options


def subcommand(name: str, help: str, *arguments: tuple[tuple[str, ...], dict], quiets_own_logs: bool = False):
    """Turn ``run(args)`` into a ``Subcommand`` that ``build_parser`` can register."""

    def declare(run: Callable[[argparse.Namespace], None]) -> Subcommand:
        return Subcommand(name, help, arguments, run, quiets_own_logs)

    return declare


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


@subcommand(
    "analyze",
    "classify every aten op of a forward pass as S/K/Gray and list the CALM sync points",
    argument(
        "model",
        metavar="NAME_OR_DIR",
        help=f"a built-in name ({', '.join(BUILTIN_NAMES)}), a local model directory, "
        "or a Hub id 'owner/name' (config only, no weights are downloaded)",
    ),
    argument("--seq-len", type=positive_int,
             help="tokens per sequence of the traced forward (default: about 128, rounded up to a size that "
             "tells the axes apart, so one trace serves every table)"),
    argument("--batch-size", type=positive_int,
             help="sequences in the traced batch (default: a small prime that tells the axes apart)"),
    argument(
        "--granularity",
        choices=("op", "module"),
        default="op",
        help="'op': op-level table, module view and CALM table; "
        "'module': the published cards' leaf-module view only",
    ),
    argument("--json", type=Path, metavar="PATH", help="also save the report as JSON"),
    argument("--plot", type=Path, metavar="PATH", help="also save a PNG map of the layers (needs matplotlib)"),
    argument("--html", type=Path, metavar="PATH",
             help="also save a self-contained HTML report (layer map, CALM phases, sharding plan, ops)"),
    argument("--no-cache", action="store_true",
             help="trace afresh and leave the analysis cache alone (cache: $HF_BWSK_CACHE, "
             "default <HF_HOME>/hf_bwsk/analysis)"),
    quiets_own_logs=True,
)
def analyze(args: argparse.Namespace) -> None:
    from .analysis import cache

    _check_outputs(args)
    material = None if args.no_cache else _cache_material(args)
    output = cache.load(material) if material is not None else None
    if output is None:
        with _library_logs(args.debug):
            output = _analyze_afresh(args)
        if material is not None:
            cache.store(material, output)
    print(output["stdout"], end="")
    for flag, saved in ANALYZE_OUTPUTS.items():
        path = getattr(args, flag)
        if path is not None:
            path.write_bytes(base64.b64decode(output["files"][flag]))
            print(saved.format(path=path))


# The files `analyze` can write: option -> the line printed once it is saved.
ANALYZE_OUTPUTS = {
    "json": "\nreport saved to {path}",
    "plot": "layer map saved to {path}",
    "html": "HTML report saved to {path}",
}


def _analyze_afresh(args: argparse.Namespace) -> dict:
    """Trace and render: the printed text and the bytes of every requested file (base64), which
    `analyze` prints and writes, from here or from the cache alike."""
    from .analysis import analyze as analyze_forward
    from .analysis import calm_report
    from .models import load_config

    config = load_config(args.model)
    default_sizes = args.seq_len is None and args.batch_size is None
    report = analyze_forward(config, seq_len=args.seq_len or DEFAULT_SEQ_LEN, batch_size=args.batch_size or DEFAULT_BATCH,
                             granularity=args.granularity, identify_axes=default_sizes)
    calm = None
    if args.granularity == "op":
        calm = calm_report(report)
        stdout = f"{report.to_table()}\n\n{report.module_view.to_table()}\n\n{calm.to_table()}\n"
    else:
        stdout = f"{report.module_view.to_table()}\n"
    files = {}
    if args.json:
        files["json"] = report.save_json(args.json)
    if args.plot:
        files["plot"] = report.plot(args.plot)
    if args.html:
        from .analysis.html import save_html

        files["html"] = save_html(args.html, report, calm)
    return {"stdout": stdout,
            "files": {flag: base64.b64encode(Path(path).read_bytes()).decode() for flag, path in files.items()}}


def _cache_material(args: argparse.Namespace) -> dict | None:
    """Everything `analyze`'s output depends on, as the key of its cache entry; None when the
    config cannot be read without transformers (a Hub id, whose config may change on the Hub, or an
    unusable directory, whose error the traced path reports)."""
    from .analysis import cache

    local = local_config_source(args.model)
    if local is None:
        return None
    source, config_file = local
    if source == DIRECTORY:
        config_file = config_file / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    outputs = sorted(flag for flag in ANALYZE_OUTPUTS if getattr(args, flag) is not None)
    return {
        "command": "analyze",
        "model": args.model,
        "source": source,
        # transformers resolves the raw config the same way for the same version (in the key).
        "config": config,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "granularity": args.granularity,
        "outputs": outputs,
        "versions": cache.versions(("matplotlib",) if args.plot is not None else ()),
        "hf_bwsk_sources": cache.source_digest(),
    }


@subcommand("env", "print library versions and the device, for bug reports")
def env(args: argparse.Namespace) -> None:
    from .env import device_description, versions

    for name, version in versions().items():
        print(f"{name}: {version or 'not installed'}")
    print(f"device: {device_description()}")


@subcommand(
    "card",
    "write README.md (model card) and its plots into a six-variant run directory",
    argument("run_dir", type=Path, metavar="RUN_DIR", help="the output_dir of an experiment run"),
    argument("--repo-id", metavar="ID", help="Hub repo id shown in the card's usage (default: a placeholder)"),
)
def card(args: argparse.Namespace) -> None:
    from .publishing.cards import write_card

    readme = write_card(args.run_dir, repo_id=args.repo_id)
    print(f"card written to {readme} (plots in {readme.parent / 'plots'})")


@subcommand(
    "push",
    "publish a six-variant run directory as one Hub repo, in one commit (token: HF_TOKEN or `hf auth login`)",
    argument("run_dir", type=Path, metavar="RUN_DIR", help="the output_dir of an experiment run"),
    argument("--repo-id", required=True, metavar="ID", help="'namespace/name' (a bare name goes to your account)"),
    argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"),
    argument("--revision", metavar="BRANCH", help="branch to commit to, created from main if needed (default: main)"),
    argument("--commit-message", metavar="TEXT", help="commit message"),
    argument("--dry-run", action="store_true", help="check the run and list every file and its size; no network"),
    argument("--allow-diverged", action="store_true",
             help="publish even a run with a diverged variant or non-finite weights (refused otherwise)"),
)
def push(args: argparse.Namespace) -> None:
    from .publishing.hub import DEFAULT_COMMIT_MESSAGE
    from .publishing.hub import push as push_run

    result = push_run(args.run_dir, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE, dry_run=args.dry_run,
                      allow_diverged=args.allow_diverged)
    print(result.to_table())
    if result.commit_url:
        print(f"commit: {result.commit_url}")


SUBCOMMANDS = (analyze, env, card, push)


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line naming the fix, exit code 2, like our own errors."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-bwsk`` parser with every subcommand of ``SUBCOMMANDS``."""
    parser = _OneLineErrorParser(prog="hf-bwsk", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        for flags, options in command.arguments:
            sub.add_argument(*flags, **options)
        sub.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        sub.set_defaults(command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-bwsk`` with ``argv`` (default: the process arguments); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # usage errors (2) and --help (0)
        return stop.code
    try:
        with contextlib.nullcontext() if args.command.quiets_own_logs else _library_logs(args.debug):
            args.command.run(args)
    except BWSKError as error:
        if args.debug:
            traceback.print_exc()
        print(f"hf-bwsk: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail on unusable output paths before the analysis runs, not after."""
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--html", args.html)):
        if path is not None and not path.parent.is_dir():
            raise BWSKError(f"the directory of {flag} {path} does not exist; create it or pick another path")
    for flag, path in (("--plot", args.plot), ("--html", args.html)):
        if path is not None and args.granularity == "module":
            raise BWSKError(f"{flag} maps the traced ops of each layer; use --granularity op or drop {flag}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BWSKError("--plot needs matplotlib; install it with: pip install 'hf-bwsk[plot]'")


def _library_logs(debug: bool):
    """The HF libraries' logs as the command wants them: all of them with ``--debug``, else quiet."""
    return contextlib.nullcontext() if debug else _quiet_library_logs()


@contextlib.contextmanager
def _quiet_library_logs():
    """Silence the HF libraries' warnings (e.g. Hub retry notices) that would break the one-line
    error contract; restore their levels afterwards, since ``main`` also runs in-process."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    levels = hub_logging.get_verbosity(), transformers_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


if __name__ == "__main__":
    sys.exit(main())
