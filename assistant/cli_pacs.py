"""`python -m assistant pacs search|pull|draft|push`: work with the hospital's PACS over DICOMweb.

    python -m assistant pacs search --url http://127.0.0.1:8042/dicom-web --patient-id 12345
    python -m assistant pacs pull   --url ... STUDY_UID --out study/
    python -m assistant pacs draft  --url ... STUDY_UID [--indication "cough"] [--accept --user dr_jones --push]
    python -m assistant pacs push   --url ... --study STUDY_UID --report 7 --user dr_jones

Credentials come from $ASSISTANT_PACS_USER/$ASSISTANT_PACS_PASSWORD or $ASSISTANT_PACS_TOKEN.
`draft` pulls the study into a private temporary folder, reads it through the de-identifying
reader and deletes the files before the model runs; the original identifiers stay in memory only,
for `export.for_pacs` when `--push` files the accepted report (DICOM SR) into the original study.
`search` prints study UIDs and counts, never patient names, ids or dates.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .pacs import Pacs


def add_commands(commands) -> None:
    from .cli import add_model_options

    pacs = commands.add_parser("pacs", help="search, pull, draft from and push reports to a PACS (DICOMweb)")
    sub = pacs.add_subparsers(dest="pacs_command", metavar="SUBCOMMAND", required=True)

    search = _command(sub, "search", "find studies (QIDO-RS); prints study UIDs and counts, no patient data")
    search.add_argument("--patient-id", default=None)
    search.add_argument("--date", default=None, help="study date YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    search.add_argument("--modality", default=None, help="e.g. CR, DX, CT")
    search.add_argument("--accession", default=None, help="accession number")
    search.add_argument("--limit", type=int, default=50)
    search.set_defaults(handler=run_search)

    pull = _command(sub, "pull", "download a study's images (WADO-RS) as .dcm files (original, identifying)")
    pull.add_argument("study", metavar="STUDY_UID")
    pull.add_argument("--series", default=None, metavar="SERIES_UID", help="only this series")
    pull.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created 0700)")
    pull.set_defaults(handler=run_pull)

    draft = _command(sub, "draft", "pull a study and print a draft report; optionally accept it and push it back")
    draft.add_argument("study", metavar="STUDY_UID")
    draft.add_argument("--series", default=None, metavar="SERIES_UID", help="only this series")
    draft.add_argument("--indication", default="", help="clinical indication (free text; PHI is masked)")
    draft.add_argument("--max-new-tokens", type=int, default=None, help="length limit of the draft")
    draft.add_argument("--accept", action="store_true", help="accept the draft (or --final) as the report of --user")
    draft.add_argument("--final", default=None, metavar="FILE", help="accept this (edited) text instead of the draft")
    draft.add_argument("--push", action="store_true", help="store the accepted report in the study as DICOM SR")
    _add_user_options(draft)
    add_model_options(draft)
    draft.set_defaults(handler=run_draft)

    push = _command(sub, "push", "store an accepted report in its original study as DICOM SR (STOW-RS)")
    push.add_argument("--study", required=True, metavar="STUDY_UID", help="the original study the report is about")
    push.add_argument("--report", required=True, type=int, metavar="ID", help="accepted report id")
    push.add_argument("--config", default=None, help="AssistantConfig JSON (for the de-identification key)")
    _add_user_options(push)
    push.set_defaults(handler=run_push)


def _command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help_text)
    command.add_argument("--url", required=True, help="DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    command.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the PACS (default 30)")
    if name != "draft":  # draft gets --debug from the model options
        command.add_argument("--debug", action="store_true", help="show full tracebacks")
    return command


def _add_user_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default=None, help="the clinician who accepts (and is named in the SR)")
    parser.add_argument("--data-dir", default=None, help="history and reports (default: $ASSISTANT_DATA_DIR)")


# ---------------------------------------------------------------------- handlers


def run_search(args) -> int:
    pacs = Pacs.from_env(args.url, timeout=args.timeout)
    matches = pacs.search(patient_id=args.patient_id, study_date=args.date, modality=args.modality,
                          accession=args.accession, limit=args.limit)
    for match in matches:
        counts = f"{_count(match.n_series)} series, {_count(match.n_instances)} instance(s)"
        print(f"{match.study_uid}  {'/'.join(match.modalities) or '-'}  {counts}")
    print(f"{len(matches)} stud{'y' if len(matches) == 1 else 'ies'} found", file=sys.stderr)
    return 0


def run_pull(args) -> int:
    pacs = Pacs.from_env(args.url, timeout=args.timeout)
    paths = pacs.pull(args.study, args.out, series_uid=args.series)
    print(f"pulled {len(paths)} image(s) into {args.out} (original DICOM with patient data: delete when done)")
    return 0


def run_draft(args) -> int:
    from .cli import config_from_args
    from .deid import load_key
    from .dicom import read_scan, read_study_identity
    from .pipeline import MAX_IMAGES_PER_STUDY, Assistant

    if (args.push or args.final) and not args.accept:
        raise ValueError("--push and --final need --accept")
    workflow = _workflow(args) if args.accept else None  # fail on a bad user or data dir before any work
    config = config_from_args(args)
    pacs = Pacs.from_env(args.url, timeout=args.timeout)
    with pacs.pulled(args.study, series_uid=args.series, max_images=MAX_IMAGES_PER_STUDY,
                     config=config.dicom) as paths:
        scans = [read_scan(path, config.dicom) for path in paths]
        identity = read_study_identity(paths[0], config.dicom)  # memory only, for --push
    draft = stream_draft(Assistant.from_config(config), scans, args.indication)
    if workflow is None:
        return 0
    report = accept(workflow, args.user, scans, draft, args.final)
    if args.push:
        push_report(pacs, report, identity, load_key(config.dicom.deid_key_file), scans)
    return 0


def run_push(args) -> int:
    from .config import AssistantConfig
    from .deid import load_key

    workflow = _workflow(args)
    report = workflow.store.get_accepted(args.report, args.user)
    if report is None:
        raise ValueError("no such accepted report for this user")
    config = AssistantConfig.from_json(args.config) if args.config else AssistantConfig()
    pacs = Pacs.from_env(args.url, timeout=args.timeout)
    push_report(pacs, report, pacs.study_identity(args.study), load_key(config.dicom.deid_key_file))
    return 0


# ---------------------------------------------------------------------- steps (also used by tests)


def stream_draft(assistant, scans: Sequence, indication: str = "", out=None) -> str:
    """Print the draft as it streams (like `python -m assistant draft`); returns the final text."""
    out = out or sys.stdout
    printed = ""
    for draft in assistant.draft_report(scans, indication=indication):
        # Each update is the whole draft; print only what is new so the terminal streams.
        out.write(draft[len(printed):] if draft.startswith(printed) else "\n" + draft)
        out.flush()
        printed = draft
    out.write("\n")
    return printed


def accept(workflow, user: str, scans: Sequence, draft: str, final_file: str | None = None):
    """Record the draft and accept it (or the edited text in `final_file`) as `user`'s report."""
    from .safety import DRAFT_LABEL

    body = draft.replace(DRAFT_LABEL, "", 1).strip()
    final = Path(final_file).read_text(encoding="utf-8") if final_file else body
    report = workflow.accept(user, workflow.record_draft(user, scans, body), final)
    print(f"accepted as report {report.id} (version {report.version}) by {report.user}", file=sys.stderr)
    return report


def push_report(pacs: Pacs, report, identity, key: bytes, scans: Sequence = ()) -> None:
    """Build the report's SR, refile it into the original study (`for_pacs` checks that the
    identity belongs to the report's study) and store it (STOW-RS)."""
    from .export import for_pacs, to_dicom_sr

    study = next((scan for scan in scans if scan.study_key == report.study_key), None)
    pacs.push(for_pacs(to_dicom_sr(report, study), identity, key))
    print(f"report {report.id} (version {report.version}) stored in the PACS study as DICOM SR", file=sys.stderr)


def _workflow(args):
    from .config import data_dir
    from .store import Store
    from .workflow import Workflow

    if not args.user:
        raise ValueError("name the accepting clinician with --user NAME")
    folder = Path(args.data_dir) if args.data_dir else data_dir()
    return Workflow(Store.open(folder / "assistant.db"), folder / "exports")


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)
