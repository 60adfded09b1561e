"""Synthea CSV tables (an export folder, or uploaded CSV files / a zip) -> `PatientRecord`.

Reads the tables a summary needs (patients, conditions, medications, allergies, observations,
care plans, encounters) from both Synthea CSV schemas in the shared data (v3 with CATEGORY and
reaction columns, and the older one without). Other tables (claims, procedures, ...) are ignored.
Dates are parsed on reading so a bad one is reported with its table and row, never its value.
Synthea's computed quality-of-life scores (QALY, DALY, QOLS) are not clinical results and are skipped.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .ehr_records import Entry, PatientRecord, RecordError, RecordText, RenderLimits, clean_name, quantity_text, render

REQUIRED = {
    "patients": {"Id", "BIRTHDATE", "GENDER"},
    "conditions": {"START", "STOP", "PATIENT", "DESCRIPTION"},
    "medications": {"START", "STOP", "PATIENT", "DESCRIPTION"},
    "allergies": {"START", "STOP", "PATIENT", "DESCRIPTION"},
    "observations": {"DATE", "PATIENT", "DESCRIPTION", "VALUE", "UNITS"},
    "careplans": {"START", "STOP", "PATIENT", "DESCRIPTION"},
    "encounters": {"START", "STOP", "PATIENT", "DESCRIPTION", "ENCOUNTERCLASS"},
}
TABLES = tuple(REQUIRED)
DATE_COLUMNS = ("BIRTHDATE", "DEATHDATE", "START", "STOP", "DATE")
NOT_RESULTS = {"QALY", "DALY", "QOLS"}
MAX_ZIP_MEMBERS, MAX_ZIP_BYTES = 64, 100_000_000

Rows = list[dict]


def table_kind(columns: Sequence[str], name_hint: str = "") -> str | None:
    """Which table a CSV is: its file name when that is a table name, else its columns."""
    cols = set(columns)
    if name_hint in REQUIRED:
        return name_hint
    if "BIRTHDATE" in cols:
        return "patients"
    if {"DATE", "VALUE"} <= cols:
        return "observations"
    if "ENCOUNTERCLASS" in cols:
        return "encounters"
    if cols & {"DISPENSES", "PAYER", "TOTALCOST"}:
        return "medications"
    if "REASONDESCRIPTION" in cols and "Id" in cols:
        return "careplans"
    if cols & {"REACTION1", "SEVERITY1", "CATEGORY"} and "START" in cols:
        return "allergies"
    if REQUIRED["conditions"] <= cols:
        return "conditions"  # the older allergies schema looks the same: name the file allergies.csv
    return None


def read_table(kind: str, text: str, label: str) -> Rows:
    """Rows of one table with its date columns parsed; RecordError names the table and row."""
    try:
        reader = csv.DictReader(io.StringIO(text))
        missing = REQUIRED[kind] - set(reader.fieldnames or ())
        if missing:
            raise RecordError(f"{label} ({kind}) lacks column(s) {', '.join(sorted(missing))}")
        return [_parse_dates(row, label, number) for number, row in enumerate(reader, 2)]
    except csv.Error as err:
        raise RecordError(f"{label} is not a readable CSV file ({err})") from None


def _parse_dates(row: dict, label: str, number: int) -> dict:
    if None in row:
        raise RecordError(f"{label} row {number} has more fields than the header")
    for column in DATE_COLUMNS:
        value = (row.get(column) or "").strip()
        if column in row:
            try:
                row[column] = datetime.date.fromisoformat(value[:10]) if value else None
            except ValueError:
                raise RecordError(f"{label} row {number}: {column} is not a date (expected YYYY-MM-DD)") from None
    return row


def patient_record(patient: Mapping | None, rows: Mapping[str, Rows]) -> PatientRecord:
    """One patient's record from their rows of each table (`patient` is their patients.csv row)."""
    def entries(kind: str, **fields) -> tuple:
        return tuple(_entry(row, **fields) for row in rows.get(kind, ()))

    observations = [r for r in rows.get("observations", ())
                    if (r.get("CODE") or "") not in NOT_RESULTS and r["DESCRIPTION"] not in NOT_RESULTS]
    return PatientRecord(
        identifiers=identifiers(patient), sex=_sex((patient or {}).get("GENDER")),
        birth=(patient or {}).get("BIRTHDATE"),
        death=(patient or {}).get("DEATHDATE"),
        conditions=entries("conditions"), medications=entries("medications", reason="REASONDESCRIPTION"),
        allergies=tuple(_entry(r, value=_reaction(r)) for r in rows.get("allergies", ())),
        observations=tuple(_entry(r, start="DATE", stop=None, value=_value(r["VALUE"], r["UNITS"]))
                           for r in observations if (r["VALUE"] or "").strip()),
        careplans=entries("careplans", reason="REASONDESCRIPTION"),
        encounters=entries("encounters", reason="REASONDESCRIPTION", category="ENCOUNTERCLASS"))


IDENTIFYING = ("Id", "SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "SUFFIX", "MAIDEN", "ADDRESS", "CITY", "ZIP")


def identifiers(patient: Mapping | None) -> tuple[str, ...]:
    """The patients.csv values that identify the patient (for masking free text, never rendered)."""
    values = [str((patient or {}).get(column) or "").strip() for column in IDENTIFYING]
    # BIRTHPLACE is "City  State  Country": only the town identifies (a state or "US" must stay readable).
    values.append(str((patient or {}).get("BIRTHPLACE") or "").split("  ")[0].strip())
    birth = (patient or {}).get("BIRTHDATE")
    values += [birth.isoformat()] if birth else []
    # Synthea appends digits to names ("Alfred550"): the bare name is what free text would repeat.
    values += [re.sub(r"\d+$", "", v) for v in values if re.fullmatch(r"[A-Za-z'-]+\d+", v)]
    return tuple(v for v in dict.fromkeys(values) if len(v) > 1)


def _entry(row: Mapping, start: str = "START", stop: str | None = "STOP", value: str = "", reason: str = "",
           category: str = "") -> Entry:
    return Entry(name=" ".join((row.get("DESCRIPTION") or "").split()), start=row.get(start),
                 stop=row.get(stop) if stop else None,
                 value=value, reason=(row.get(reason) or "").strip() if reason else "",
                 category=(row.get(category) or "").strip() if category else "")


def _sex(code: str | None) -> str | None:
    code = (code or "").strip().lower()
    return {"m": "male", "f": "female"}.get(code, code or None)


def _reaction(row: Mapping) -> str:
    reaction = (row.get("DESCRIPTION1") or "").strip()
    severity = (row.get("SEVERITY1") or "").strip().lower()
    return f"{reaction} ({severity})" if reaction and severity else reaction


def _value(raw: str, unit: str) -> str:
    raw = " ".join((raw or "").split())
    try:
        return quantity_text(float(raw), unit)
    except ValueError:
        return clean_name(raw)  # a coded or text answer ("Never smoker"): its unit is a code-system tag


def group_by_patient(tables: Mapping[str, Rows]) -> tuple[dict[str, dict], dict[str, dict[str, Rows]]]:
    """(patients.csv rows by id, every other table's rows by patient and table)."""
    people = {row["Id"]: row for row in tables.get("patients", ())}
    grouped: dict[str, dict[str, Rows]] = defaultdict(lambda: defaultdict(list))
    for kind, rows in tables.items():
        for row in rows if kind != "patients" else ():
            grouped[row["PATIENT"]][kind].append(row)
    return people, grouped


# ---- an export folder ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheaExport:
    """A Synthea CSV export read once; render many patients from it."""

    folder: Path
    people: Mapping[str, dict]
    rows: Mapping[str, Mapping[str, Rows]]

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheaExport":
        folder = Path(folder)
        if not (folder / "patients.csv").is_file():
            raise RecordError(f"no Synthea CSV export in {folder} (patients.csv not found)")
        tables = {kind: read_table(kind, (folder / f"{kind}.csv").read_text(encoding="utf-8-sig"), f"{kind}.csv")
                  for kind in TABLES if (folder / f"{kind}.csv").is_file()}
        people, grouped = group_by_patient(tables)
        return cls(folder, people, grouped)

    def patient_ids(self) -> list[str]:
        return sorted(self.people)

    def record(self, patient_id: str) -> PatientRecord:
        if patient_id not in self.people:
            raise RecordError(f"no such patient in the export at {self.folder}")
        return patient_record(self.people[patient_id], self.rows.get(patient_id, {}))

    def render(self, patient_id: str, as_of: datetime.date | None = None,
               limits: RenderLimits = RenderLimits()) -> RecordText:
        return render(self.record(patient_id), "synthea", as_of, limits)

    def encounter_dates(self, patient_id: str) -> list[datetime.date]:
        """The patient's visit dates, oldest first (`render(..., as_of=day)` gives the record then)."""
        return sorted({r["START"] for r in self.rows.get(patient_id, {}).get("encounters", ()) if r["START"]})


# ---- uploads -------------------------------------------------------------------------------------

def record_from_csv_files(files: Sequence[tuple[str, str, bytes]], patient_id: str | None = None) -> PatientRecord:
    """One patient's record from uploaded (label, name hint, bytes): CSV tables or zips of them."""
    tables: dict[str, Rows] = defaultdict(list)
    for label, hint, data in _csv_members(files):
        text = _decode(data, label)
        header = next(csv.reader(io.StringIO(text)), [])
        kind = table_kind(header, hint)
        if kind is None:
            continue  # another Synthea table (claims, procedures, ...): not part of a summary
        tables[kind] += read_table(kind, text, label)
    if not tables:
        raise RecordError("no Synthea table found: upload patients, conditions, medications, allergies, "
                          "observations, careplans or encounters CSV files (with their header row)")
    people, grouped = group_by_patient(tables)
    chosen = _choose_patient(sorted(set(people) | set(grouped)), patient_id)
    return patient_record(people.get(chosen), grouped.get(chosen, {}))


def _choose_patient(ids: list[str], patient_id: str | None) -> str:
    if patient_id is not None:
        if patient_id not in ids:
            raise RecordError("the requested patient is not in the uploaded record")
        return patient_id
    if len(ids) != 1:
        raise RecordError(f"the upload holds {len(ids)} patients' records; upload one patient's record"
                          if ids else "the upload holds no patient rows")
    return ids[0]


def _csv_members(files: Sequence[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    out = []
    for label, hint, data in files:
        if data[:4] == b"PK\x03\x04":
            out += _zip_members(label, data)
        else:
            out.append((label, hint, data))
    return out


def _zip_members(label: str, data: bytes) -> list[tuple[str, str, bytes]]:
    """CSV members of a zip, with limits checked before anything is inflated (zip bombs)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(".csv")
                   and not Path(m.filename).name.startswith(("._", "."))]
        if len(members) > MAX_ZIP_MEMBERS or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise RecordError(f"{label}: the zip is too large (at most {MAX_ZIP_MEMBERS} CSV files, "
                              f"{MAX_ZIP_BYTES:,} bytes unpacked)")
        return [(f"{label}, member {n}", Path(m.filename).stem.lower(), archive.read(m))
                for n, m in enumerate(members, 1)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as err:
        raise RecordError(f"{label} is not a readable zip file ({type(err).__name__})") from None


def _decode(data: bytes, label: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecordError(f"{label} is not UTF-8 text (save the CSV as UTF-8)") from None
