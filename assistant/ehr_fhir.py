"""A FHIR R4 Bundle (JSON) -> `PatientRecord`, validated with fhir.resources' R4B models.

Reads Patient (sex, birth and death dates: used for ages only), Condition, MedicationRequest,
MedicationStatement, AllergyIntolerance, Observation (components become separate results),
CarePlan and Encounter. Entered-in-error and refuted entries are dropped; inactive, resolved,
completed or stopped ones end (on their stated date, or an unstated one: `date.min`). Names come
from a concept's text, else its first coding's display, else its code. Other resource types are
ignored. Bundles with several patients need `patient_id` (the Patient resource's id).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable

from .ehr_records import Entry, PatientRecord, RecordError, quantity_text

ENDED = datetime.date.min  # "has ended, date not stated"
_DROP = {"entered-in-error", "refuted", "cancelled", "revoked"}
# HL7 v3 ActCode encounter classes (Encounter.class), as a clinician would say them.
_VISIT_CLASSES = {"AMB": "ambulatory", "EMER": "emergency", "IMP": "inpatient", "ACUTE": "inpatient",
                  "NONAC": "inpatient", "OBSENC": "observation", "SS": "short stay", "HH": "home health",
                  "VR": "virtual", "FLD": "field", "PRENC": "pre-admission"}
_ENDED = {"inactive", "resolved", "remission", "completed", "stopped", "not-taken"}


def record_from_bundle(data: bytes | str | dict, patient_id: str | None = None) -> PatientRecord:
    bundle = validated_bundle(data)
    entries = [(e.fullUrl, e.resource) for e in bundle.entry or () if e.resource is not None]
    resources = [r for _, r in entries]
    patient = _choose_patient([r for r in resources if _type(r) == "Patient"], patient_id)
    refs = _patient_refs(patient, entries)
    own = [r for r in resources if not refs or _subject(r) in refs or _subject(r) is None]
    names = {f"{_type(r)}/{r.id}": r for r in own if getattr(r, "id", None)}
    names.update({url: r for url, r in entries if url})
    return PatientRecord(
        identifiers=identifiers(patient), sex=getattr(patient, "gender", None),
        birth=_day(getattr(patient, "birthDate", None)),
        death=_day(getattr(patient, "deceasedDateTime", None)),
        conditions=_of(own, "Condition", _condition), medications=_medications(own, names),
        allergies=_of(own, "AllergyIntolerance", _allergy),
        observations=tuple(e for r in own if _type(r) == "Observation" for e in _observations(r)),
        careplans=_of(own, "CarePlan", lambda r: _careplan(r, names)), encounters=_of(own, "Encounter", _encounter))


def identifiers(patient) -> tuple[str, ...]:
    """What identifies the patient in a Patient resource (for masking free text, never rendered)."""
    if patient is None:
        return ()
    values = [patient.id or "", str(patient.birthDate or "")]
    for name in patient.name or ():
        values += [name.text or "", name.family or "", *(name.given or ())]
    values += [x.value or "" for x in (*(patient.identifier or ()), *(patient.telecom or ()))]
    for address in patient.address or ():
        values += [address.text or "", *(address.line or ()), address.city or "", address.postalCode or ""]
    return tuple(v.strip() for v in dict.fromkeys(values) if len(v.strip()) > 1)


def validated_bundle(data: bytes | str | dict):
    from fhir.resources.R4B.bundle import Bundle

    obj = data if isinstance(data, dict) else _json(data)
    kind = obj.get("resourceType") if isinstance(obj, dict) else None
    if kind != "Bundle":
        shown = kind if isinstance(kind, str) and re.fullmatch(r"[A-Za-z]{1,40}", kind) else "no"
        raise RecordError(f"expected a FHIR R4 Bundle (resourceType \"Bundle\"), got {shown} resourceType")
    try:
        return Bundle.model_validate(obj)
    except (KeyError, LookupError):
        raise RecordError("not a valid FHIR R4 Bundle: an entry has an unknown resourceType") from None
    except Exception as err:  # pydantic's ValidationError and the models' own checks
        raise RecordError(f"not a valid FHIR R4 Bundle: {_first_problem(err)}") from None


def _json(data: bytes | str):
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise RecordError("the JSON file is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _first_problem(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        found = errors(include_input=False, include_url=False)
        where = ".".join(str(part) for part in found[0]["loc"]) if found else "bundle"
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        return f"{where}: {found[0]['msg'] if found else 'invalid'}{more}"
    return type(err).__name__


def _choose_patient(patients: list, patient_id: str | None):
    if patient_id is not None:
        chosen = [p for p in patients if p.id == patient_id]
        if not chosen:
            raise RecordError("the requested patient is not in the bundle")
        return chosen[0]
    if len(patients) > 1:
        raise RecordError(f"the bundle holds {len(patients)} patients; upload one patient's record")
    return patients[0] if patients else None


def _patient_refs(patient, entries: list) -> set[str]:
    """The references that point at the chosen patient ("Patient/ID" and its fullUrl)."""
    if patient is None:
        return set()
    refs = {f"Patient/{patient.id}"} if patient.id else set()
    refs |= {url for url, r in entries if r is patient and url}
    return refs


def _type(resource) -> str:
    return resource.get_resource_type()


def _subject(resource) -> str | None:
    ref = getattr(resource, "subject", None) or getattr(resource, "patient", None)
    return getattr(ref, "reference", None)


def _of(resources: Iterable, kind: str, convert) -> tuple[Entry, ...]:
    return tuple(e for r in resources if _type(r) == kind and (e := convert(r)) is not None)


def concept(value) -> str:
    """A CodeableConcept's (or Coding's) readable name."""
    if value is None:
        return ""
    if getattr(value, "text", None):
        return value.text.strip()
    codings = getattr(value, "coding", None) or ([value] if hasattr(value, "display") else [])
    for coding in codings:
        if coding.display or coding.code:
            return (coding.display or coding.code).strip()
    return ""


def _status(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else concept(value).lower()


def _day(value) -> datetime.date | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    text = str(value)
    parts = (text[:4], text[5:7] or "01", text[8:10] or "01")  # partial FHIR dates: "1970", "1970-05"
    try:
        return datetime.date(*(int(p) for p in parts))
    except ValueError:
        return None


def _period(resource, prefix: str) -> tuple[datetime.date | None, datetime.date | None]:
    period = getattr(resource, f"{prefix}Period", None)
    start = _day(getattr(resource, f"{prefix}DateTime", None)) or _day(getattr(period, "start", None))
    return start, _day(getattr(period, "end", None))


def _ending(status: str, stop: datetime.date | None) -> datetime.date | None:
    return stop or (ENDED if status in _ENDED else None)


def _condition(r) -> Entry | None:
    if _status(r.verificationStatus) in _DROP or not concept(r.code):
        return None
    start, _ = _period(r, "onset")
    stop = _day(r.abatementDateTime) or _day(getattr(r.abatementPeriod, "end", None))
    return Entry(concept(r.code), start or _day(r.recordedDate), _ending(_status(r.clinicalStatus), stop))


def _medications(resources: list, names: dict) -> tuple[Entry, ...]:
    out = []
    for r in resources:
        if _type(r) not in ("MedicationRequest", "MedicationStatement") or r.status in _DROP:
            continue
        name = concept(r.medicationCodeableConcept) or _referenced(r.medicationReference, names, r)
        start = _day(getattr(r, "authoredOn", None)) or _period(r, "effective")[0]
        stop = _period(r, "effective")[1] if _type(r) == "MedicationStatement" else None
        reasons = (r.reasonCode or []) if hasattr(r, "reasonCode") else []
        reason = concept(reasons[0]) if reasons else _referenced((r.reasonReference or [None])[0], names, r)
        if name:
            out.append(Entry(name, start, _ending(r.status, stop), reason=reason))
    return tuple(out)


def _referenced(reference, names: dict, owner) -> str:
    """The name of a referenced Medication/Condition (contained, in the bundle, or its display)."""
    if reference is None:
        return ""
    target = reference.reference or ""
    contained = {f"#{c.id}": c for c in getattr(owner, "contained", None) or () if getattr(c, "id", None)}
    found = contained.get(target) or names.get(target)
    return concept(getattr(found, "code", None)) if found is not None else (reference.display or "")


def _allergy(r) -> Entry | None:
    if _status(r.verificationStatus) in _DROP or not concept(r.code):
        return None
    start, _ = _period(r, "onset")
    reaction = next((concept(m) for x in r.reaction or () for m in x.manifestation or ()), "")
    severity = next((x.severity for x in r.reaction or () if x.severity), "")
    value = f"{reaction} ({severity})" if reaction and severity else reaction
    return Entry(concept(r.code), start or _day(r.recordedDate), _ending(_status(r.clinicalStatus), None), value)


def _observations(r) -> list[Entry]:
    if r.status in _DROP:
        return []
    day = _period(r, "effective")[0] or _day(r.issued)
    parts = [(concept(r.code), r)] + [(concept(c.code), c) for c in r.component or ()]
    return [Entry(name, day, value=value) for name, holder in parts if name and (value := _value(holder))]


def _value(holder) -> str:
    quantity = getattr(holder, "valueQuantity", None)
    if quantity is not None and quantity.value is not None:
        return quantity_text(float(quantity.value), quantity.unit or quantity.code or "")
    for field in ("valueCodeableConcept", "valueString", "valueInteger", "valueBoolean"):
        value = getattr(holder, field, None)
        if value is not None:
            return concept(value) if field == "valueCodeableConcept" else str(value).lower() \
                if isinstance(value, bool) else str(value)
    return ""


def _careplan(r, names: dict) -> Entry | None:
    if r.status in _DROP:
        return None
    categories = [concept(c) for c in r.category or () if concept(c).lower() not in ("assess-plan", "")]
    name = r.title or (categories[-1] if categories else "") or r.description or ""
    reason = _referenced((r.addresses or [None])[0], names, r)
    start, stop = _day(getattr(r.period, "start", None)), _day(getattr(r.period, "end", None))
    return Entry(name.strip(), start, _ending(r.status, stop), reason=reason) if name.strip() else None


def _encounter(r) -> Entry | None:
    if r.status in _DROP:
        return None
    name = concept((r.type or [None])[0]) or concept(r.serviceType)
    kind = getattr(r, "class_fhir", None)
    kind = _VISIT_CLASSES.get(getattr(kind, "code", None) or "", concept(kind).lower())
    reason = concept((r.reasonCode or [None])[0])
    start = _day(getattr(r.period, "start", None))
    return Entry(name, start, None, reason=reason, category=kind) if name else None
