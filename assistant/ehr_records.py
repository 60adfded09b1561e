"""EHR records as de-identified clinical text, with the facts a grounded summary is built from.

Three inputs, one output. A Synthea CSV export (`../shared/data/synthea/*`), an uploaded FHIR R4
Bundle (JSON) and an uploaded Synthea-style CSV (one table, several tables, or a zip of an export)
are all parsed into a `PatientRecord` (dated entries, never shown) and rendered by `render` into a
`RecordText`: the text the summariser reads plus its `facts` (active problems, current
medications, allergies, recent results, follow-ups; past problems too) for building training
targets (`reference_summary`) and for checking a summary against its record.

What never reaches the text: names, addresses, SSNs, identifiers of any kind, birth dates or any
calendar date. Time is given as the patient's age at the event; ages of 90 and over are written
"90 or older" (HIPAA Safe Harbor). Sex is kept. Free text inside the record (an item's text, a
reason, a text result) is PHI-masked with the patient's own identifiers as known canaries.

    from assistant.ehr_records import patient_ids, render_patient, record_from_upload
    record = render_patient(folder, patient_ids(folder)[0])     # RecordText
    record = record_from_upload("bundle.json")                  # FHIR R4 Bundle, CSV(s) or zip
    record.text, record.section("medications"), reference_summary(record)

Bad input raises `RecordError` with a one-line message that never quotes a value from the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .phi import mask_phi

SECTIONS = ("problems", "medications", "allergies", "results", "follow_up")  # what a summary must cover
SUMMARY_HEADINGS = {"problems": "Problems", "medications": "Medications", "allergies": "Allergies",
                    "results": "Recent results", "follow_up": "Follow-up"}  # prompts/summarize.md's sections
SYNTHEA_FOLDER = "synthea"
SUMMARY_RESULTS = 5  # the most recent results a summary should carry
_SALTS = frozenset("sodium potassium calcium hydrochloride hydrocholoride sulfate acetate bitartrate citrate maleate "
                   "succinate tartrate besylate mesylate fumarate".split())
_UNITS = {"Cel": "°C", "[degF]": "°F", "mm[Hg]": "mmHg"}  # UCUM codes a reader would stumble on
MAX_UPLOAD_BYTES = 20_000_000
_SEMANTIC_TAG = re.compile(r"\s*\((?:disorder|finding|situation|procedure|morphologic abnormality|record artifact|"
                           r"qualifier value|observable entity|regime/therapy|substance|event)\)\s*$", re.I)


class RecordError(ValueError):
    """Malformed or unusable record input (one line, no values quoted from the file)."""


@dataclass(frozen=True)
class Entry:
    """One dated item of a record: a condition, medication, allergy, result, care plan or visit."""

    name: str
    start: datetime.date | None = None
    stop: datetime.date | None = None
    value: str = ""  # a result's value with unit; an allergy's reaction
    reason: str = ""  # why a medication, care plan or visit was given
    category: str = ""  # a visit's class (ambulatory, wellness, ...)

    def active_on(self, day: datetime.date) -> bool:
        return (self.start is None or self.start <= day) and (self.stop is None or self.stop > day)


@dataclass(frozen=True)
class PatientRecord:
    """A parsed record. Birth and death dates stay here, only to compute ages; never rendered."""

    sex: str | None = None
    birth: datetime.date | None = None
    death: datetime.date | None = None
    conditions: tuple[Entry, ...] = ()
    medications: tuple[Entry, ...] = ()
    allergies: tuple[Entry, ...] = ()
    observations: tuple[Entry, ...] = ()
    careplans: tuple[Entry, ...] = ()
    encounters: tuple[Entry, ...] = ()
    # The patient's own names, ids, address and contact details: never rendered, used only to mask
    # them wherever free text in the record repeats them (phi.mask_phi's known identifiers).
    identifiers: tuple[str, ...] = ()

    def entries(self) -> tuple[Entry, ...]:
        return (*self.conditions, *self.medications, *self.allergies, *self.observations, *self.careplans,
                *self.encounters)

    def reference_date(self) -> datetime.date | None:
        """The record's "now": its latest dated event (or the death)."""
        days = [d for e in self.entries() for d in (e.start, e.stop) if d is not None]
        days += [self.death] if self.death else []
        return max(days, default=None)

    def until(self, day: datetime.date) -> "PatientRecord":
        """The record as it stood on `day`: later entries dropped, later stops not yet known."""
        def cut(entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
            return tuple(dataclasses.replace(e, stop=e.stop if e.stop and e.stop <= day else None)
                         for e in entries if e.start is None or e.start <= day)
        return dataclasses.replace(
            self, death=self.death if self.death and self.death <= day else None,
            **{name: cut(getattr(self, name)) for name in
               ("conditions", "medications", "allergies", "observations", "careplans", "encounters")})


@dataclass(frozen=True)
class Fact:
    section: str  # one of SECTIONS, or "past_problems"
    name: str  # the item as the record names it ("Clopidogrel 75 MG Oral Tablet")
    key: str  # the short form a summary must mention ("Clopidogrel")
    statement: str  # the record's line for it, verbatim without "- " and the final "."
    value: str = ""  # results only ("13.2 g/dL")


@dataclass(frozen=True)
class RecordText:
    text: str
    facts: tuple[Fact, ...]
    source: str  # "synthea", "fhir" or "csv"
    age: int | None = None
    sex: str | None = None

    def section(self, name: str) -> tuple[Fact, ...]:
        return tuple(f for f in self.facts if f.section == name)

    def item_names(self) -> tuple[str, ...]:
        """Every condition, medication, allergy and care plan the text names (for faithfulness checks)."""
        return tuple(f.name for f in self.facts if f.section != "results")


@dataclass(frozen=True)
class RenderLimits:
    """How much history the text carries: the summariser's prompt holds about 8,000 characters."""

    past_problems: int = 8
    results: int = 12
    visits: int = 3


@dataclass(frozen=True)
class PatientRef:
    """A Synthea patient: the export folder and the patient's id there (never rendered or logged)."""

    export: Path
    patient_id: str

    @property
    def key(self) -> str:
        """A pseudonym for result files and logs."""
        return hashlib.sha256(f"synthea:{self.patient_id}".encode()).hexdigest()[:12]


# ---- rendering -----------------------------------------------------------------------------------

def clean_name(name: str) -> str:
    """Synthea/SNOMED display text without its semantic tag ("Fever (finding)" -> "Fever")."""
    return " ".join(_SEMANTIC_TAG.sub("", name or "").split())


def quantity_text(number: float, unit: str = "") -> str:
    """A measured value for the text: 4 significant digits (whole numbers from 1,000), a readable unit."""
    text = f"{number:.0f}" if abs(number) >= 1000 else f"{number:.4g}"
    unit = (unit or "").strip().strip("{}")
    return f"{text} {_UNITS.get(unit, unit)}".strip()


def age_at(birth: datetime.date | None, day: datetime.date | None) -> int | None:
    if birth is None or day is None or day < birth:
        return None  # day unknown (date.min stands for "ended, date not stated") or before birth
    return max(day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day)), 0)


def age_text(birth: datetime.date | None, day: datetime.date | None) -> str | None:
    """The age in years, or "90 or older" (exact ages over 89 identify people)."""
    age = age_at(birth, day)
    return None if age is None else ("90 or older" if age >= 90 else str(age))


def short_key(section: str, name: str) -> str:
    """What a summary has to say to mention an item: a drug without dose and form, a test without
    its LOINC qualifiers ("Hemoglobin [Mass/volume] in Blood" -> "Hemoglobin")."""
    if section == "medications":
        words = re.sub(r"^(?:NDA\d+\s+)?(?:[\d.]+\s+(?:HR|ML|ACTUAT)\s+)+", "", name).split()
        head = []
        for word in words:
            if re.match(r"[\d.]", word) or word == "/":
                break
            head.append(word)
        while len(head) > 1 and head[-1].lower() in _SALTS:
            head.pop()  # "Warfarin Sodium" is said "warfarin"
        return " ".join(head) or name
    if section == "results":
        return re.split(r"\s+\[|\s+-\s+|/|\s+\(", name, maxsplit=1)[0].strip() or name
    return clean_name(name)


def render(record: PatientRecord, source: str, as_of: datetime.date | None = None,
           limits: RenderLimits = RenderLimits()) -> RecordText:
    """The record as de-identified clinical text (ages, never dates) with its facts."""
    now = as_of or record.reference_date() or datetime.date.today()
    record = record.until(now)
    age = age_text(record.birth, record.death or now)
    lines, facts = [_header(record, age)], []
    for title, section, items in _sections(record, now, limits):
        # Free text (a coded item's text, a reason, a result) may repeat who the patient is.
        items = [tuple(mask_phi(part, record.identifiers) if part else part for part in item) for item in items]
        lines += ["", f"{title}:"]
        lines += [f"- {statement}." for _, statement, _ in items] or ["- None recorded."]
        facts += [Fact(section, name, short_key(section, name), statement, value) for name, statement, value in items
                  if section != "visits"]
    years = age_at(record.birth, record.death or now)
    return RecordText("\n".join(lines) + "\n", tuple(facts), source, min(years, 90) if years is not None else None,
                      record.sex)


def _header(record: PatientRecord, age: str | None) -> str:
    sex = record.sex or "sex not stated"
    if record.death:
        return f"Patient: {sex}, died at age {age}." if age else f"Patient: {sex}, deceased."
    return f"Patient: {sex}, age {age}." if age else f"Patient: {sex}, age not stated."


def _sections(record: PatientRecord, now: datetime.date, limits: RenderLimits) -> list[tuple[str, str, list]]:
    birth = record.birth
    active = _unique([c for c in record.conditions if c.active_on(now)])
    active_names = {clean_name(c.name).lower() for c in active}
    past = _unique([c for c in record.conditions if not c.active_on(now)
                    and clean_name(c.name).lower() not in active_names], newest_first=True)
    results = _latest_results(record.observations, limits.results)
    visits = list(reversed(_by_date(record.encounters)))[:limits.visits]
    return [
        ("Active problems", "problems", [_item(c, birth, since=True) for c in active]),
        ("Past problems", "past_problems", [_resolved(c, birth) for c in past[:limits.past_problems]]),
        ("Current medications", "medications",
         [_item(m, birth, since=True) for m in _unique([m for m in record.medications if m.active_on(now)])]),
        ("Allergies", "allergies",
         [_item(a, birth) for a in _unique([a for a in record.allergies if a.active_on(now)])]),
        ("Recent results", "results", [_result(o, birth) for o in results]),
        ("Care plans and follow-up", "follow_up",
         [_item(p, birth, since=True) for p in _unique([p for p in record.careplans if p.active_on(now)])]),
        ("Recent visits", "visits", [_visit(v, birth) for v in visits]),
    ]


def _by_date(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.start or datetime.date.min, clean_name(e.name).lower()))


def _unique(entries: Sequence[Entry], newest_first: bool = False) -> list[Entry]:
    """One entry per name: the first in date order (or the latest, newest first)."""
    ordered = _by_date(entries)
    seen, out = set(), []
    for entry in reversed(ordered) if newest_first else ordered:
        name = clean_name(entry.name).lower()
        if name and name not in seen:
            seen.add(name)
            out.append(entry)
    return out


def _item(entry: Entry, birth, since: bool = False) -> tuple[str, str, str]:
    name = clean_name(entry.name)
    text = name + (f", reaction: {entry.value}" if entry.value else "")
    text += f", for {clean_name(entry.reason)}" if entry.reason else ""
    age = age_text(birth, entry.start)
    text += f" (since age {age})" if since and age else ""
    return name, text, ""


def _resolved(entry: Entry, birth) -> tuple[str, str, str]:
    name, age = clean_name(entry.name), age_text(birth, entry.stop or entry.start)
    return name, f"{name} (resolved by age {age})" if age else f"{name} (resolved)", ""


def _result(entry: Entry, birth) -> tuple[str, str, str]:
    age = age_text(birth, entry.start)
    return entry.name, f"{entry.name}: {entry.value}" + (f" (age {age})" if age else ""), entry.value


def _visit(entry: Entry, birth) -> tuple[str, str, str]:
    name, age = clean_name(entry.name), age_text(birth, entry.start)
    text = name + (f", {entry.category} visit" if entry.category else "")
    text += (f", for {clean_name(entry.reason)}" if entry.reason else "") + (f" (age {age})" if age else "")
    return name, text, ""


def _latest_results(observations: Sequence[Entry], limit: int) -> list[Entry]:
    """The latest value of each test, most recent first (ties by name)."""
    latest: dict[str, Entry] = {}
    for entry in _by_date(observations):
        latest[entry.name.lower()] = entry
    ordered = sorted(latest.values(), key=lambda e: (-(e.start or datetime.date.min).toordinal(), e.name.lower()))
    return ordered[:limit]


def reference_summary(record: RecordText, max_results: int = SUMMARY_RESULTS) -> str:
    """A grounded target summary: each line copied from the record, in the summariser's sections.

    Starts with "Problems:" (the prompt ends there; a training target drops that first line).
    """
    parts = []
    for section in SECTIONS:
        facts = record.section(section)[:max_results if section == "results" else None]
        body = [f"- {f.statement}." for f in facts] or ["- None recorded."]
        parts.append("\n".join([f"{SUMMARY_HEADINGS[section]}:", *body]))
    return "\n\n".join(parts) + "\n"


def summary_continuation(record: RecordText, max_results: int = SUMMARY_RESULTS) -> str:
    """The training target for `prompts/summarize.md`: the reference summary after the prompt's
    closing "Problems:" line (what `Assistant.summarize` lets the model write)."""
    return reference_summary(record, max_results).removeprefix(f"{SUMMARY_HEADINGS['problems']}:\n")


# ---- Synthea exports -----------------------------------------------------------------------------

def synthea_dirs(root: str | Path | None = None) -> list[Path]:
    """The Synthea export folders under the shared data (each holds a patients.csv)."""
    base = Path(root) if root else _shared_data_dir() / SYNTHEA_FOLDER
    return sorted(p.parent for p in base.glob("*/patients.csv"))


def patient_ids(data_dir: str | Path) -> list[str]:
    """Patient ids of one export, sorted."""
    from .ehr_synthea import SyntheaExport

    return SyntheaExport.load(data_dir).patient_ids()


def render_patient(data_dir: str | Path, patient_id: str, as_of: datetime.date | None = None,
                   limits: RenderLimits = RenderLimits()) -> RecordText:
    """One Synthea patient as de-identified text with facts (load the export once with
    `ehr_synthea.SyntheaExport.load(data_dir)` when rendering many)."""
    from .ehr_synthea import SyntheaExport

    return SyntheaExport.load(data_dir).render(patient_id, as_of, limits)


@dataclass(frozen=True)
class SyntheaSplit:
    train: tuple[PatientRef, ...]
    test: tuple[PatientRef, ...]
    seed: int
    excluded_empty: int = 0  # patients without any condition or medication (nothing to summarise)
    folders: tuple[str, ...] = field(default_factory=tuple)


def synthea_split(root: str | Path | None = None, test_fraction: float = 0.25, seed: int = 13) -> SyntheaSplit:
    """Patients with at least one condition or medication, split by sha256(seed:id); each side is
    ordered by that hash, so `test[:N]` is a fixed seeded sample. Training must use `train` only."""
    from .ehr_synthea import SyntheaExport

    refs, empty = [], 0
    for folder in synthea_dirs(root):
        export = SyntheaExport.load(folder)
        for pid in export.patient_ids():
            record = export.record(pid)
            if record.conditions or record.medications:
                refs.append(PatientRef(folder, pid))
            else:
                empty += 1
    score = {r: _unit_hash(seed, r.patient_id) for r in refs}
    ordered = sorted(refs, key=score.get)
    return SyntheaSplit(tuple(r for r in ordered if score[r] >= test_fraction),
                        tuple(r for r in ordered if score[r] < test_fraction), seed, empty,
                        tuple(f.name for f in synthea_dirs(root)))


def _unit_hash(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def _shared_data_dir() -> Path:
    env = os.environ.get("ASSISTANT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- uploads -------------------------------------------------------------------------------------

def record_from_upload(paths: str | Path | Sequence[str | Path], patient_id: str | None = None,
                       as_of: datetime.date | None = None) -> RecordText:
    """An uploaded record as text: a FHIR R4 Bundle (.json), Synthea-style CSV table(s), or a zip of
    a Synthea CSV export. Several CSV files together form one record. `patient_id` picks a patient
    when the upload holds several."""
    from .ehr_fhir import record_from_bundle
    from .ehr_synthea import record_from_csv_files

    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise RecordError("upload a FHIR R4 Bundle (.json) or Synthea-style CSV file(s)")
    contents = [(f"file {n}", path.stem.lower(), _read_upload(path, n)) for n, path in enumerate(files, 1)]
    if len(contents) == 1 and contents[0][2].lstrip()[:1] in (b"{", b"["):
        return render(record_from_bundle(contents[0][2], patient_id), "fhir", as_of)
    if any(data.lstrip()[:1] in (b"{", b"[") for _, _, data in contents):
        raise RecordError("upload one FHIR Bundle on its own, not together with other files")
    return render(record_from_csv_files(contents, patient_id), "csv", as_of)


def _read_upload(path: Path, number: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise RecordError(f"file {number} has {size:,} bytes; a record upload may have at most "
                              f"{MAX_UPLOAD_BYTES:,}")
        data = path.read_bytes()
    except OSError:
        raise RecordError(f"file {number} cannot be read") from None
    if not data.strip():
        raise RecordError(f"file {number} is empty")
    return data
