"""Detect and mask PHI in free clinical text before it reaches a prompt, the case index or a log.

Pattern-based on purpose: spaCy/NER models cannot be installed offline, and a deterministic
masker is auditable. Recall comes from three layers: formats (dates, phones, e-mails, ids),
context (titles, "Name:" labels, signatures, "<First Last> presented"), and the identifiers the
caller already knows from the record or DICOM header, which are always masked. A stop-list keeps
eponyms, drugs, anatomy, months and headings from being taken for names.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

KINDS = ("NAME", "DATE", "PHONE", "EMAIL", "ADDRESS", "MRN", "SSN", "URL", "IP", "AGE_OVER_89", "ZIP", "ID")
_PLACEHOLDER = re.compile(r"\[(?:%s)\]" % "|".join(KINDS))


@dataclass(frozen=True)
class PhiSpan:
    """A half-open character range [start, end) of `text` holding PHI of one kind."""

    start: int
    end: int
    kind: str


# Capitalised words that are not names here. Title-case eponyms (Parkinson, Crohn, Down), drugs,
# anatomy, months and headings would otherwise match "<Cap> <Cap>" name contexts.
_STOP = frozenset(w.lower() for w in """
January February March April May June July August September October November December Jan Feb Mar
Apr Jun Jul Aug Sep Sept Oct Nov Dec Monday Tuesday Wednesday Thursday Friday Saturday Sunday Today
Tonight Yesterday Tomorrow Morning Evening Night Week Month Year Day Days Weeks Non
Tylenol Advil Motrin Aleve Lipitor Crestor Norco Percocet Vicodin Coumadin Warfarin Lasix Zofran Keflex
Xarelto Eliquis Plavix Synthroid Lantus Humalog Novolog Zoloft Prozac Xanax Ativan Ambien Flomax
Protonix Nexium Prilosec Zithromax Augmentin Cipro Levaquin Bactrim Vancomycin Zosyn Albuterol Ventolin
ProAir Symbicort Advair Spiriva Singulair Metformin Glucophage Januvia Jardiance Ozempic Trulicity
Lisinopril Norvasc Toprol Lopressor Coreg Entresto Aldactone Imdur Nitrostat Medrol Decadron Benadryl
Claritin Zyrtec Allegra Flonase Narcan Suboxone Dilaudid Oxycontin Neurontin Lyrica Keppra Depakote
Lamictal Tegretol Dilantin Sinemet Aricept Namenda Seroquel Zyprexa Risperdal Haldol Abilify
Wellbutrin Lexapro Celexa Cymbalta Effexor Trazodone Humira Remicade Enbrel Keytruda Opdivo Herceptin
Aspirin Heparin Insulin Prednisone Amoxicillin Ceftriaxone Morphine Fentanyl Tramadol Gabapentin
Chest Lung Lungs Heart Cardiac Left Right Upper Lower Middle Lobe Base Apex Abdomen Pelvis Head Neck
Spine Cervical Thoracic Lumbar Sacral Knee Hip Shoulder Hand Foot Ankle Wrist Elbow Brain Liver Kidney
Renal Hepatic Pulmonary Coronary Aortic Mitral Tricuspid Valve Artery Vein Bowel Colon Breast Skin
History Findings Finding Impression Assessment Plan Indication Comparison Technique Exam Examination
Report Reason Chief Complaint Present Illness Medications Medication Allergies Review Systems Physical
Vital Vitals Signs Labs Lab Results Diagnosis Diagnoses Procedure Procedures Discharge Admission
Summary Hospital Course Disposition Follow Up Instructions Social Family Past Medical Surgical Note
Notes Progress Addendum Clinical Recommendations Subjective Objective Emergency Department Unit Clinic
Center Radiology Cardiology Oncology Neurology Surgery Medicine Internal General Intensive Care ICU
The A An This That These Those He She They His Her Their It Its We Our I You No Not Yes And Or With
Without Is Was Were Be Been Has Had Have Will Would Should Can Could May Might For From To In On At By
Of As If Then Also Per Via New Old Normal Acute Chronic Stable Mild Moderate Severe Small Large
Bilateral Status Post Type Stage Grade Class Level Total Positive Negative Male Female Man Woman Boy
Girl Baby Infant Adult Child Dear Hello Thank Thanks Please Sincerely Regards Doctor Nurse Team Service
Primary Attending Resident Fellow Intern Patient Pt Name Signed Electronically Dictated Transcribed
Reviewed Read Contact Syndrome Disease Disorder Palsy Lymphoma Sign Test Score Scale Criteria
Cardiovascular Respiratory Neuro Neurologic Extremities Psych Psychiatric General Constitutional
Blood Pressure Rate Temperature Pulse Oxygen Saturation Weight Height Dimes Presented Denies Reports
States Complains Underwent Chart Record Medical Information Education Consent Code Full DNR Vaccine
Covid Influenza Pfizer Moderna Tdap Diabetes Mellitus Hypertension Cancer Carcinoma Heparin Lactated
Ringer Ringers Normal Saline Health Insurance Medicare Medicaid Street Avenue Road Drive Lane
Identification Safety Portal Pertinent Brief Hospitalist CT MRI COPD CHF CAD HTN DM ED ICU ER MRN DOB
CXR ECG EKG BP HR RR PE DVT MI CVA TIA UTI AKI CKD ESRD GERD HIV HCV NPO PRN BID TID QID PO IV IM SQ
OT AP PA RLL LLL RUL LUL RML NAD WNL ROS HPI PMH PSH SH FH US UK NHS MD RN NP DO PACS AI ID MR
Number No XXXX POD Contour Contours Silhouette Mediastinal Mediastinum Hilar Case Management Social Work
Pharmacy Nutrition Therapy Palliative Hospice Rehab
""".split())

# Eponyms are also surnames ("John Wilson", "Mr. Parkinson"): they stop being names when a disease
# word follows ("Wilson disease") or, in weak contexts, when the pair is all eponyms ("Epstein Barr").
_EPONYMS = frozenset(w.lower() for w in """
Parkinson Crohn Hodgkin Down Bell Alzheimer Graves Hashimoto Addison Cushing Wilson Huntington Kaposi
Raynaud Sjogren Tourette Asperger Guillain Barre Epstein Barr Babinski Murphy McBurney Homan Kernig
Brudzinski Romberg Trendelenburg Valsalva Heimlich Apgar Glasgow Foley Swan Ganz Hickman Kerley Baker
Wernicke Korsakoff Paget Dupuytren Osgood Schlatter Legg Perthes Colles Barrett Meniere Bright Burkitt
Ewing Wilms Kawasaki Marfan Turner Klinefelter Wolff White Horner Pancoast Kussmaul Cheyne Stokes
""".split())
_DISEASE_WORD = re.compile(r"(?:['’]s)?[\s-]+(?:disease|syndrome|palsy|lymphoma|sign|dementia|sarcoma|tumou?r|"
                           r"esophagus|catheter|maneuver|position|triad|lines?|cyst|fracture|score|scale|"
                           r"ulcer|arthritis|thyroiditis|disorder|type|virus|respiration)\b", re.I)

_MONTHS = ("January February March April May June July August September October November December "
           "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec").split()
_MONTH = "(?:%s)" % "|".join(sorted({m for w in _MONTHS for m in (w, w.upper())}, key=len, reverse=True))
_NAME_TOK = r"(?:[A-Z][a-z]{0,2}['’]?[A-Z]?[a-z]{1,20}(?:-[A-Z][a-z]{1,20})?|[A-Z]{2,20}(?:['’-][A-Z]{1,20})?)"
_NAME = rf"(?<![\w'’-])(?:[A-Z]\.[ \t]*)?{_NAME_TOK}(?:[ \t]+(?:{_NAME_TOK}|[A-Z]\.|[A-Z]\b)){{0,3}}"
# Exactly two or three title-case words: the shape accepted from weaker, verb/preposition contexts.
_TITLE_TOK = r"[A-Z][a-z]{0,2}['’]?[A-Z]?[a-z]{1,20}(?:-[A-Z][a-z]{1,20})?"
_NAME2 = rf"(?<![\w'’-]){_TITLE_TOK}(?:[ \t]+[A-Z]\.?)?[ \t]+{_TITLE_TOK}"
_STATES = ("AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ "
           "NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC").split()
_STATE = "(?:%s)" % "|".join(_STATES)
_SUFFIX = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
           r"Terrace|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Crescent|Close|Trail|Plaza|Gardens|Grove)")
_UK_POSTCODE = r"\b[A-Z]{1,2}\d[A-Z\d]?[ ]?\d[ABD-HJLNP-UW-Z]{2}\b"
_CREDENTIALS = r"(?:MD|M\.D\.|DO|RN|NP|PA-C|MBBS|MBChB|FRCR|FRCP|FRCS|PhD|DNP|CRNA|RRT|PharmD|MSN|BSN|LPN|MRCP)"
_NAME_LABELS = (r"patient name|pt name|name|patient|pt|signed(?: by)?|electronically signed by|dictated by|"
                r"transcribed by|attending(?: physician)?|resident|fellow|radiologist|"
                r"referring(?: physician| provider)?|"
                r"ordering(?: physician| provider)?|physician|provider|pcp|reviewed by|read by|interpreted by|cc|"
                r"emergency contact|contact|next of kin|nok|spouse|wife|husband|mother|father|son|daughter|"
                r"guardian|caregiver|surgeon|technologist")
_CLINICAL_VERBS = (r"presented|presents|presenting|was|is|has|had|reports|reported|denies|denied|states|stated|"
                   r"complains|complained|underwent|returns|returned|arrived|came|called|notes|noted|agrees|"
                   r"agreed|declined|tolerated|will|lives|works|remains|developed|received|appears")
_RELATIONS = (r"seen by|seen with|referred by|referred to|discussed with|spoke with|spoke to|per|consulted|"
              r"accompanied by|d/w|with|by|to|from|and|wife|husband|daughter|son|mother|father|sister|brother|"
              r"spouse|partner|friend|caregiver|niece|nephew|grandson|granddaughter|"
              r"name is|name's")  # "My name is Jane Roe": how people introduce themselves in a chat
_LINE_START = r"(?:^|(?<=[\n.;,(|\]]))[ \t]*"


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern
    group: str = "phi"  # the named group to mask; context words around it stay readable
    check: Callable[[str], bool] | None = None
    strict_name: bool = False  # weak context: every name token must be off the stop-list


def _valid_dmy(s: str) -> bool:
    a, b = (int(x) for x in re.split(r"[/.-]", s)[:2])
    return (1 <= a <= 12 and 1 <= b <= 31) or (1 <= b <= 12 and 1 <= a <= 31)


def _valid_ip(s: str) -> bool:
    return all(int(p) <= 255 for p in s.split("."))


def _digits_between(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda s: lo <= sum(c.isdigit() for c in s) <= hi


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _r(kind: str, pattern: str, flags: int = 0, **kw) -> _Rule:
    return _Rule(kind, re.compile(pattern, flags | re.MULTILINE), **kw)


_RULES: tuple[_Rule, ...] = (
    _r("EMAIL", r"(?<![\w.+-])(?P<phi>[\w.+-]{1,64}@[\w-]+(?:\.[\w-]+)+)"),
    _r("URL", r"(?P<phi>(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]])", re.I),
    _r("IP", r"(?<![\d.])(?P<phi>(?:\d{1,3}\.){3}\d{1,3})(?![\d.]*\d)", check=_valid_ip),
    _r("SSN", r"(?<![\d-])(?P<phi>\d{3}-\d{2}-\d{4})(?![\d-])"),
    _r("SSN", r"(?i:ssn|social security(?: number| no\.?)?|ss#)\s*[:#]?\s*(?P<phi>\d{3}[ -]?\d{2}[ -]?\d{4})\b"),
    _r("MRN", r"(?i:mrn|mr\s?#|mr\s?no\.?|medical record(?: number| no\.?| #)?"
              r"|med(?:ical)? rec(?:ord)?\.?(?: #| no\.?| number)?"
              r"|hospital (?:number|no\.?|#)|unit (?:number|no\.?)|nhs (?:number|no\.?)|chart (?:#|no\.?|number))"
              r"\s*[:#]?\s*(?P<phi>[A-Z]{0,3}-?\d(?:[ -]?\d){3,})\b"),
    _r("ID", r"(?i:accession|acc|patient id|pt id|pid|member id|subscriber id|policy|insurance id|health plan id|"
             r"account|acct|licen[cs]e|dea|npi|serial|device id|encounter|visit|study id|order|specimen|claim|"
             r"certificate|vin)\s*(?i:number|no\.?|id|#)?\s*[:#]\s*(?P<phi>[A-Z0-9][A-Z0-9-]{3,})\b", check=_has_digit),
    _r("ID", r"(?i:accession|npi|dea)\s+(?i:number\s+|no\.?\s+)?(?P<phi>[A-Z]{0,2}\d{5,})\b"),
    _r("ID", r"(?<![\d.])(?P<phi>[12](?:\.\d+){5,})(?![\d.])"),  # DICOM UIDs embed site and study
    _r("DATE", r"(?<![\d.])(?P<phi>(?:19|20)\d{2}([-/.])(?:0?[1-9]|1[0-2])\2(?:0?[1-9]|[12]\d|3[01])"
               r"(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?)(?![\d])"),
    _r("DATE", r"(?<![\d./-])(?P<phi>\d{1,2}([/-])\d{1,2}\2(?:\d{4}|\d{2}))(?![\d/]|[.-]\d)", check=_valid_dmy),
    _r("DATE", r"(?<![\d./-])(?P<phi>\d{1,2}\.\d{1,2}\.(?:19|20)\d{2})(?![\d.])", check=_valid_dmy),
    _r("DATE", r"(?<![\d/])(?P<phi>(?:0?[1-9]|1[0-2])/(?:19|20)\d{2})(?![\d/])"),
    _r("DATE", rf"(?<![\d])(?P<phi>\d{{1,2}}(?:st|nd|rd|th)?(?:\s+of)?[\s-]+{_MONTH}\.?"
               rf"(?:,?[\s-]+(?:\d{{4}}|'?\d{{2}}))?)(?![\w])"),
    _r("DATE", rf"\b(?P<phi>{_MONTH}\.?[\s-]+\d{{1,2}}(?:st|nd|rd|th)?(?:,?[\s-]+\d{{4}})?)(?![\w:])"),
    _r("DATE", rf"\b(?P<phi>{_MONTH}\.?,?\s+(?:19|20)\d{{2}})\b"),
    _r("DATE", r"(?i:dob|d\.o\.b\.?|date of birth|birth ?date)\s*[:#]?\s*(?P<phi>(?:19|20)\d{6})\b"),
    _r("AGE_OVER_89", r"\b(?P<phi>(?:9\d|1[01]\d))(?=[\s-]*(?:years?|yrs?|y)[\s-]*(?:old|o\b|/o)|\s?(?:yo|y/o|y\.o\.)|"
                      r"yo[MF]\b|\s(?:year|yr)s?\b)", re.I),
    _r("AGE_OVER_89", r"\b(?i:aged?|age:)\s*(?P<phi>9\d|1[01]\d)\b"),
    _r("AGE_OVER_89", r"\b(?P<phi>(?i:ninety|one hundred)(?:[- ](?i:one|two|three|four|five|six|seven|eight|nine))?)"
                      r"(?=[- ](?i:years?|yrs?)\b)"),
    _r("PHONE", r"\b(?i:phone|tel|telephone|cell|mobile|pager|fax|callback)\.?\s*(?i:no\.?|number|#)?\s*[:#]?\s*"
                r"(?P<phi>\+?[\d(][\d() .-]{5,}\d)", check=_digits_between(5, 15)),
    _r("PHONE", r"(?<![\w/.+-])(?P<phi>(?:\+?1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
                r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?)(?![\w/-])"),
    _r("PHONE", r"(?P<phi>(?:\+44\s?(?:\(0\)\s?)?|(?<![\w.])0)\d{2,4}[ ]?\d{3,4}[ ]?\d{3,4})(?![\d])",
       check=_digits_between(10, 13)),
    _r("PHONE", r"(?<![\w+])(?P<phi>\+\d{1,3}[ .-]?(?:\(?\d{1,4}\)?[ .-]?){1,4}\d{2,4})(?![\d])",
       check=_digits_between(8, 15)),
    _r("ZIP", rf"(?i:zip(?: code)?|postal code|post ?code)\s*[:#]?\s*(?P<phi>\d{{5}}(?:-\d{{4}})?|{_UK_POSTCODE})"),
    _r("ZIP", rf"\b{_STATE}\s+(?P<phi>\d{{5}}(?:-\d{{4}})?)\b"),
    _r("ZIP", rf"(?<=, )(?P<phi>{_UK_POSTCODE})"),
    _r("ADDRESS", rf"(?P<phi>\b\d{{1,6}}[A-Za-z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z0-9][A-Za-z0-9'-]*\.?\s+){{1,4}}"
                  rf"{_SUFFIX}\b\.?"
                  r"(?:,?\s*(?:Apt|Apartment|Unit|Suite|Ste|Flat|#)\.?\s*[\w-]+)?"
                  r"(?:,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2})?(?:,?\s*[A-Z]{2}\b)?)"),
    _r("ADDRESS", r"\b(?P<phi>(?i:p\.?\s?o\.?\s?box)\s+\d+)"),
    _r("ADDRESS", r"(?i:address|addr|lives at|resides at|residing at)\s*:?\s*"
                  r"(?P<phi>\d[^\n;]{3,80}?)(?=\s*(?:\n|$|;|\.\s|\.$))"),
    _r("NAME", r"(?P<phi>\b[A-Z][A-Za-z'-]+\^[A-Z][A-Za-z'-]*(?:\^[A-Za-z.'-]*){0,3})"),  # DICOM PN value
    _r("NAME", rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Doctor)\.?[ \t]+(?P<phi>{_NAME})"),
    _r("NAME", rf"\b(?:Patient\.?|(?i:patient)|(?i:pt)\.?)[ \t]+(?P<phi>{_NAME})", strict_name=True),
    _r("NAME", rf"{_LINE_START}(?i:{_NAME_LABELS})\s*:\s*(?:(?:Dr|Mr|Mrs|Ms)\.?\s+)?"
               rf"(?P<phi>{_NAME_TOK},\s*{_NAME}|{_NAME})"),
    _r("NAME", rf"(?P<phi>{_NAME})\s*,?\s+{_CREDENTIALS}(?![\w])"),
    _r("NAME", rf"(?:^|/s/\s*|--\s*)(?P<phi>{_NAME2})[ \t]*$", strict_name=True),  # bare signature line
    _r("NAME", rf"(?P<phi>{_NAME2}|{_TITLE_TOK},[ \t]+{_TITLE_TOK})\s+(?:{_CLINICAL_VERBS})\b", strict_name=True),
    _r("NAME", rf"\b(?i:{_RELATIONS})\s*[,(:]?\s*(?P<phi>{_NAME2})", strict_name=True),
    _r("NAME", rf"(?P<phi>{_NAME2}),?\s+(?:an?\s+)?\d{{1,3}}(?:[ -]?(?:yo|y/o|y\.o\.|years?|yr)|[ ]?[MF])\b",
       strict_name=True),  # demographics: "Jane Roe, 45F" / "Jane Roe, a 67-year-old"
    _r("NAME", r"\b(?i:wife|husband|daughter|son|mother|father|sister|brother|spouse|partner)\s*,?\s+"
               rf"(?P<phi>{_TITLE_TOK})\b", strict_name=True),
)


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    """Lower-case vocabulary of consumer-health text (see the JSON's "about"); read once, on demand."""
    path = Path(__file__).parent / "rules" / "phi_common_words.json"
    return frozenset(json.loads(path.read_text(encoding="utf-8"))["words"])


def _word_key(word: str) -> str:
    return re.sub(r"['’]s$", "", word.strip(".'’")).lower()


def _trim_name(text: str, start: int, end: int, strict: bool) -> tuple[int, int] | None:
    """Drop stop-listed words from the ends of a name candidate; strict contexts reject any."""
    words = list(re.finditer(r"[^\s,]+", text[start:end]))
    eponyms = all(_word_key(w.group()) in _EPONYMS for w in words)
    banned = _STOP | _EPONYMS if (strict and eponyms) or _DISEASE_WORD.match(text, end) else _STOP
    keep = [w for w in words if _word_key(w.group()) not in banned]
    if not keep or (strict and len(keep) != len(words)):
        return None
    if strict and all(_word_key(w.group()) in _common_words() for w in keep):
        return None  # "Dyspnea There is ...": ordinary words that happen to be capitalised
    first = words.index(keep[0])
    last = words.index(keep[-1])
    if any(w not in keep for w in words[first:last + 1]):
        return None  # a stop word in the middle means this is not one name
    if all(len(w.group().rstrip(".")) == 1 for w in keep):
        return None  # initials alone
    return start + words[first].start(), start + words[last].end()


def _rule_spans(text: str) -> list[PhiSpan]:
    spans = []
    for rule in _RULES:
        for m in rule.pattern.finditer(text):
            start, end = m.span(rule.group)
            if start < 0 or (rule.check and not rule.check(m.group(rule.group))):
                continue
            if rule.kind == "NAME" and "^" not in m.group(rule.group):
                trimmed = _trim_name(text, start, end, rule.strict_name)
                if trimmed is None:
                    continue
                start, end = trimmed
            spans.append(PhiSpan(start, end, rule.kind))
    return spans


def _propagate_names(text: str, spans: list[PhiSpan]) -> list[PhiSpan]:
    """A surname found once ("Mr. Smith") is PHI everywhere else in the same note ("Smith reports")."""
    tokens = {w for s in spans if s.kind == "NAME" for w in re.findall(r"[A-Za-z'’-]{3,}", text[s.start:s.end])}
    tokens = {t for t in tokens if t.lower() not in _STOP and t[0].isupper()}
    out = []
    for tok in sorted(tokens):
        alts = "|".join(re.escape(v) for v in {tok, tok.upper(), tok.capitalize()})
        for m in re.finditer(rf"(?<![\w^])(?:{alts})(?![\w^])", text):
            out.append(PhiSpan(m.start(), m.end(), "NAME"))
    return out


def _dicom_date_variants(s: str) -> list[str]:
    m = re.fullmatch(r"((?:19|20)\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])", s)
    if not m:
        return []
    y, mo, d = m.groups()
    return [f"{y}-{mo}-{d}", f"{mo}/{d}/{y}", f"{int(mo)}/{int(d)}/{y}", f"{d}/{mo}/{y}", f"{mo}/{d}/{y[2:]}"]


def _name_variants(raw: str) -> list[str]:
    """'DOE^JOHN^Q' / 'Doe, John' / 'John Doe' -> the orders and initial forms used in notes."""
    if "^" in raw:
        parts = [p for p in raw.split("^") if p]
        family, given, middle = (parts + ["", "", ""])[:3]
    elif "," in raw:
        family, _, rest = raw.partition(",")
        given, _, middle = rest.strip().partition(" ")
    else:
        words = raw.split()
        given, family, middle = words[0], words[-1], " ".join(words[1:-1])
    family, given, middle = family.strip(), given.strip(), middle.strip().rstrip(".")
    full = [f"{given} {family}", f"{family}, {given}", f"{family} {given}", f"{given[:1]}. {family}",
            f"{given[:1]} {family}", f"{family}^{given}"]
    if middle:
        full += [f"{given} {middle} {family}", f"{given} {middle[:1]}. {family}", f"{given} {middle[:1]} {family}"]
    return [raw] + [v for v in full if v.strip(" ,.^")]


def _name_parts(raw: str) -> list[str]:
    """Single name words, matched only as 'Doe' or 'DOE' so 'white cells' survives a Mr. White."""
    words = [w for w in re.split(r"[\s,^.]+", raw) if len(w) >= 2]
    return [v for w in words for v in {w.capitalize(), w.upper()}]


def _known_rules(known: Iterable[str]) -> list[tuple[str, re.Pattern]]:
    rules = []
    for raw in (k.strip() for k in known if k and k.strip()):
        if "@" in raw:
            rules.append(("EMAIL", re.compile(re.escape(raw), re.I)))
        elif dates := _dicom_date_variants(raw):
            alts = "|".join(re.escape(v) for v in [raw, *dates])
            rules.append(("DATE", re.compile(rf"(?<!\d)(?:{alts})(?!\d)")))
        elif sum(c.isdigit() for c in raw) >= 4:
            # Identifiers are re-typed with or without separators: match digit-by-digit.
            core = r"[\s.-]?".join(re.escape(c) for c in raw if c.isalnum())
            rules.append(("ID", re.compile(rf"(?<![\w])(?:{core})(?![\w])", re.I)))
        elif re.fullmatch(r"[^\W\d_][\w ,.^'’-]*", raw):
            alts = "|".join(re.escape(v) for v in sorted(set(_name_variants(raw)), key=len, reverse=True))
            rules.append(("NAME", re.compile(rf"(?<![\w])(?:{alts})(?![\w])", re.I)))
            parts = "|".join(re.escape(v) for v in sorted(set(_name_parts(raw)), key=len, reverse=True))
            rules.append(("NAME", re.compile(rf"(?<![\w])(?:{parts})(?![\w])")))
        else:
            rules.append(("ID", re.compile(re.escape(raw), re.I)))
    return rules


def _merge(spans: Iterable[PhiSpan]) -> list[PhiSpan]:
    """Union overlapping spans; the merged span takes the kind of its longest member."""
    merged: list[tuple[int, int, PhiSpan]] = []
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and s.start < merged[-1][1]:
            start, end, best = merged[-1]
            longer = s if (s.end - s.start) > (best.end - best.start) else best
            merged[-1] = (start, max(end, s.end), longer)
        else:
            merged.append((s.start, s.end, s))
    return [PhiSpan(a, b, best.kind) for a, b, best in merged]


def find_phi(text: str, known_identifiers: Iterable[str] = ()) -> list[PhiSpan]:
    """Sorted, non-overlapping PHI spans in `text`; known identifiers are always included."""
    spans = _rule_spans(text)
    for kind, pattern in _known_rules(known_identifiers):
        spans += [PhiSpan(m.start(), m.end(), kind) for m in pattern.finditer(text) if m.end() > m.start()]
    spans += _propagate_names(text, spans)
    # Placeholders from an earlier pass are already safe; never re-mask inside them.
    protected = [m.span() for m in _PLACEHOLDER.finditer(text)]
    spans = [s for s in spans if not any(a <= s.start and s.end <= b for a, b in protected)]
    return _merge(spans)


def mask_phi(text: str, known_identifiers: Iterable[str] = ()) -> str:
    """Replace every PHI span with `[KIND]`. Re-applies until stable so masking is idempotent."""
    known = tuple(known_identifiers)
    # Each pass can reveal a new name context (e.g. "Dr [NAME]Dr AA"), so adversarial text may need
    # many passes; the bound only stops pathological input from looping forever.
    for _ in range(64):
        spans = find_phi(text, known)
        if not spans:
            break
        parts, pos = [], 0
        for s in spans:
            parts += [text[pos:s.start], f"[{s.kind}]"]
            pos = s.end
        text = "".join(parts) + text[pos:]
    return text


class PhiLogFilter(logging.Filter):
    """Masks PHI in each record's final message (and traceback text) before any handler sees it.

    Attach it to handlers, not only loggers: a logger's filters do not run for records that
    propagate up from child loggers, while a handler's filters see every record it emits.
    """

    def __init__(self, known_identifiers: Iterable[str] = (), name: str = "") -> None:
        super().__init__(name)
        self.known_identifiers = tuple(known_identifiers)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format would make logging print raw msg and args to stderr
            message = f"{record.msg} {record.args!r}"
        record.msg = mask_phi(message, self.known_identifiers)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_phi(record.exc_text, self.known_identifiers)
        if record.stack_info:
            record.stack_info = mask_phi(record.stack_info, self.known_identifiers)
        return True
