"""Command line: `python -m assistant COMMAND ...` (`--help` lists the commands).

Known bad input (unreadable image, wrong model path, bad option) ends with one `error:` line and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .config import DEFAULT_EMBEDDER, DEFAULT_LLM, AssistantConfig

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m assistant",
        description="Multimodal clinical assistant (research use only; outputs are drafts for clinician review).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prepare = commands.add_parser("prepare", help="convert/verify the offline base models and build the app's "
                                  "indexes (run once)")
    prepare.add_argument("--data-dir", default=None, help="where the app's indexes go (default: $ASSISTANT_DATA_DIR)")
    add_model_options(prepare)
    prepare.set_defaults(handler=lambda args: run_prepare(config_from_args(args), args.data_dir))

    draft = commands.add_parser("draft", help="print a draft radiology report for DICOM/PNG/JPEG files")
    draft.add_argument("files", nargs="+", metavar="FILE", help="images of one study (frontal, lateral, prior)")
    draft.add_argument("--indication", default="", help="clinical indication (free text; PHI is masked)")
    draft.add_argument("--max-new-tokens", type=int, default=None, help="length limit of the draft")
    add_model_options(draft)

    draft.set_defaults(handler=lambda args: run_draft(config_from_args(args), args.files, args.indication))
    # Each further command group lives in its own module and registers its subcommands here; a
    # subcommand sets `handler(args) -> exit code` and calls add_model_options if it needs models.
    for register in _command_groups():
        register(commands)
    return parser


def _command_groups():
    from . import cli_evaluate, cli_index, cli_pacs, cli_serve, cli_train, cli_users, cli_vision

    return [cli_vision.add_commands, cli_index.add_commands, cli_users.add_commands, cli_evaluate.add_commands,
            cli_train.add_commands, cli_pacs.add_commands, cli_serve.add_commands]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default=None, help=f"local HF model folder (default: built-in {DEFAULT_LLM})")
    parser.add_argument("--embedder", default=None, help=f"local embedder folder (default: {DEFAULT_EMBEDDER})")
    parser.add_argument("--adapter", default=None, help="adapter folder from `train` (projector, vision, LoRA)")
    parser.add_argument("--config", default=None, help="AssistantConfig JSON file to start from")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set llm.lora_r=8 (JSON values)")
    # Text generation on an OpenAI-compatible server. Not `--backend`: `index build` uses that name.
    parser.add_argument("--llm-backend", choices=("local", "openai"), default=None,
                        help="where text-only generation runs (default: local); image drafts always run locally")
    parser.add_argument("--base-url", default=None, help="the server's API root, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--served-model", default=None, help="model name on the server (default: its only model)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


_OPTION_FIELDS = (("llm", "llm.path"), ("embedder", "embedder"), ("adapter", "adapter"),
                  ("llm_backend", "backend.kind"), ("base_url", "backend.base_url"),
                  ("served_model", "backend.model"))


def config_from_args(args: argparse.Namespace) -> AssistantConfig:
    config = AssistantConfig.from_json(args.config) if args.config else AssistantConfig()
    overrides = dict(_parse_assignment(item) for item in args.set)
    for option, name in _OPTION_FIELDS:
        if getattr(args, option, None) is not None:
            overrides[name] = getattr(args, option)
    if getattr(args, "max_new_tokens", None) is not None:
        overrides["generation.max_new_tokens"] = args.max_new_tokens
    return config.override(overrides)


def _parse_assignment(item: str) -> tuple[str, object]:
    name, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw  # bare strings need no quotes


def run_prepare(config: AssistantConfig, folder: str | None = None) -> int:
    from pathlib import Path

    from .app_retrieval import prepare_indexes
    from .base_models import resolve_llm_dir
    from .cli_index import text_embedder
    from .config import data_dir

    start = time.perf_counter()
    llm_dir = resolve_llm_dir(config.llm.path)
    print(f"LLM ready: {llm_dir} ({time.perf_counter() - start:.1f} s)")
    embedding = text_embedder(config)
    print(f"Embedder ready: {config.embedder} ({embedding[0].dim}-d)")
    # The app's similar-case and patient-education indexes, built once into the data folder.
    prepare_indexes(Path(folder) if folder else data_dir(), config, embedding)
    return 0


def run_draft(config: AssistantConfig, files: Sequence[str], indication: str) -> int:
    from .dicom import read_scan
    from .pipeline import Assistant

    # Read (and de-identify) the images first: bad input fails in a second, not after a model load.
    scans = [read_scan(path, config.dicom) for path in files]
    assistant = Assistant.from_config(config)
    printed = ""
    for draft in assistant.draft_report(scans, indication=indication):
        # Each update is the whole draft; print only what is new so the terminal streams.
        if draft.startswith(printed):
            sys.stdout.write(draft[len(printed):])
        else:
            sys.stdout.write("\n" + draft)
        sys.stdout.flush()
        printed = draft
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure becomes one actionable line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE


def user_message(err: BaseException) -> str:
    """One line for users. Our own errors already say what to do; others get their type named."""
    from .backend import BackendError
    from .base_models import ModelPathError

    raw = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # KeyError's str() adds quotes
    text = (str(raw).strip().splitlines() or [""])[0]
    known = (ModelPathError, ValueError, KeyError, FileNotFoundError, BackendError)
    if isinstance(err, known) and text:
        return text
    return f"unexpected {type(err).__name__}: {text} (rerun with --debug for details)"
