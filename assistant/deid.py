"""DICOM de-identification: PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The attribute list is Table E.1-1 as transcribed by the `dicom-anonymizer` package (Kitware,
BSD-3-Clause, generated from the standard, edition 2026c; `TABLE_EDITION`). Its engine is not
used: it keeps a process-wide map of random UIDs (not stable across restarts, grows forever),
prints to stdout, and applies the table to the top level only. dicognito fakes names and keeps
descriptions and comments (not the E.1-1 table); pydicom/deid is recipe-based with no keyed UIDs.

Actions of the basic-profile column, applied at every nesting level:
  X remove · Z empty · D dummy value of the element's VR · U keyed UID remap.
  Conditional ones keep the object valid whatever its IOD: X/Z -> Z, X/D, Z/D, X/Z/D -> D;
  a sequence under an X-or-Z choice is emptied (its items could carry codes naming an
  institution), under D or X/Z/U* it is kept and cleaned item by item.
Beyond the table: private elements are removed; a UID not in the table is remapped unless it is
a class, transfer-syntax or registered UID (a new instance UID must not slip through); the file
meta AE titles and network addresses are removed; remaining free text (LT/ST/UT, e.g. SR text
items) is cleaned (C) with `phi.mask_phi`, seeded with the object's own patient identifiers;
the 128-byte preamble is zeroed. Pixel data is never touched: burned-in text is *flagged*
(`DeidResult.burned_in`), not removed, because no Clean Pixel Data option is implemented.

UIDs: HMAC-SHA256(deployment key, uid) as a "2.25." UUID-derived UID (PS3.5 B.2), so one study
maps to the same UID in every file, upload and restart of a deployment, and nobody without the
key can link it to the original. The key comes from $ASSISTANT_DEID_KEY or a key file created on
first use (0600). Losing the key only breaks the link to earlier pseudonyms; leaking it lets a
holder of an original UID confirm a match (never reverse one). Keep it out of config JSON.

Raw element bytes are read directly wherever possible: converting a value makes pydicom validate
it, and its validation warnings quote the value (a UID or name) into the logs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID_dictionary

from assistant.config import data_dir
from assistant.phi import mask_phi

__all__ = ["KEY_ENV", "TABLE_EDITION", "METHOD", "DeidError", "DeidKeyError", "DeidResult",
           "StudyIdentity", "load_key", "remap_uid", "deidentify", "study_identity", "profile_action",
           "profile_table"]

# pydicom validates values as it converts them, and its warnings and log records quote the value:
# a malformed UID or name in a hostile file would reach the logs. Nothing in this project relies on
# those warnings, so value validation on reading is off for the process (a library setting, set
# once, here because every DICOM reader path imports this module).
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

KEY_ENV = "ASSISTANT_DEID_KEY"
TABLE_EDITION = "dicomfields_2026c"  # dicom-anonymizer's transcription of PS3.15 2026c, E.1-1
# DeidentificationMethod is LO (64 characters a value), multi-valued: one value per step.
METHOD = ("DICOM PS3.15 E.1-1 Basic Profile (2026c)", "keyed-hash UIDs (HMAC-SHA256)")
_MIN_KEY_CHARS = 16
_CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
               "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
               "X_Z_U_STAR_TAGS": "X/Z/U*"}
# The most permissive choice that keeps any IOD valid (see the module docstring).
_RESOLVED = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
_SQ_RESOLVED = {"X": "X", "Z": "Z", "X/Z": "Z", "X/D": "Z", "Z/D": "Z", "X/Z/D": "Z",
                "D": "CLEAN", "X/Z/U*": "CLEAN", "U": "CLEAN"}
_DUMMY = {"AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101",
          "DS": "0", "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
          "PN": "ANONYMIZED^", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
          "UC": "ANONYMIZED", "UR": "http://anonymized.invalid", "UT": "ANONYMIZED"}
_NUMERIC = frozenset({"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV", "AT"})
_FREE_TEXT = frozenset({"LT", "ST", "UT"})
_MAX_CLEAN_CHARS = 64 * 1024  # longer free text is emptied rather than scanned
# File meta elements naming the sending/receiving stations (not in E.1-1, still identifying).
_META_REMOVE = tuple(Tag(0x0002, e) for e in (0x0016, 0x0017, 0x0018, 0x0026, 0x0027, 0x0028,
                                               0x0100, 0x0102))
# Modalities and SOP classes that commonly carry burned-in patient text in the pixels.
_BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC", "IVUS"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_PATIENT_ID = Tag(0x0010, 0x0020)
# The object's own identifiers, masked wherever free text repeats them.
_CANARY_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientAddress")
# What a PACS needs to file an object in the original study (Patient + General Study modules).
IDENTITY_KEYWORDS = ("StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID",
                     "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                     "StudyTime", "ReferringPhysicianName")


class DeidError(ValueError):
    """De-identification failed; the object must not be stored or shown. One-line, no values."""


class DeidKeyError(DeidError):
    """No usable de-identification key."""


@dataclass(frozen=True, eq=False)
class DeidResult:
    dataset: Dataset
    burned_in: str  # "yes" | "possible" | "unknown" | "no": text burned into the pixels?
    counts: Mapping[str, int]  # elements per action: removed, emptied, dummy, uid, cleaned

    @property
    def needs_pixel_review(self) -> bool:
        """Pixels may show patient text: a person must check them before release."""
        return self.burned_in in ("yes", "possible")


@dataclass(frozen=True, eq=False, repr=False)
class StudyIdentity:
    """The original identifiers of a study, for filing a result back in the hospital's PACS.

    Hold it only in memory on the trusted side (never store, log or show it); `repr` and `str`
    withhold the values so an accidental log line carries none.
    """

    values: Mapping[str, str] = field(default_factory=dict)

    @property
    def study_uid(self) -> str:
        return self.values.get("StudyInstanceUID", "")

    def __repr__(self) -> str:
        return "StudyIdentity(<withheld>)"

    __str__ = __repr__


# ---------------------------------------------------------------- key and UIDs


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """The deployment's secret: $ASSISTANT_DEID_KEY, else `key_file` (default <data dir>/deid.key),
    created with 32 random bytes and mode 0600 when missing."""
    env = os.environ.get(KEY_ENV)
    if env is not None:
        if len(env.strip()) < _MIN_KEY_CHARS:
            raise DeidKeyError(f"{KEY_ENV} must hold at least {_MIN_KEY_CHARS} characters")
        return env.strip().encode("utf-8")
    path = Path(key_file) if key_file else data_dir() / "deid.key"
    try:
        return _read_or_create_key(path)
    except OSError:
        raise DeidKeyError(f"the de-identification key file is not usable: set {KEY_ENV} or "
                           "DicomConfig.deid_key_file to a writable location") from None


def _read_or_create_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # O_EXCL: two processes starting at once must end up with one key, not two
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_or_create_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        key = path.read_bytes().strip()
    if len(key) < _MIN_KEY_CHARS:
        raise DeidKeyError(f"the de-identification key file holds fewer than {_MIN_KEY_CHARS} "
                           "characters")
    return key


def remap_uid(uid: str, key: bytes) -> str:
    """'2.25.' + a UUIDv8 (RFC 9562) made of HMAC-SHA256(key, uid): stable, keyed, one-way."""
    digest = bytearray(hmac.new(key, uid.strip("\x00 ").encode("ascii", "replace"),
                                hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: custom
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122/9562 variant
    return "2.25." + str(int.from_bytes(digest, "big"))


def _pseudonym_id(value: str, key: bytes) -> str:
    # Patient ID is kept linkable within the deployment (prior studies of one patient), unreadable
    # outside it.
    return "ANON-" + hmac.new(key, b"patient-id:" + value.encode("utf-8", "replace"),
                              hashlib.sha256).hexdigest()[:16].upper()


# ---------------------------------------------------------------- the profile table


@functools.lru_cache(maxsize=1)
def profile_table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """({tag: action}, ((group, element, group mask, element mask, action), ...)) of E.1-1."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    database = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORIES.items():
        for entry in database[category]:
            if len(entry) == 4:  # repeating groups such as (60xx,3000) Overlay Data
                masked.append((*entry, action))
            else:
                exact[int(Tag(entry))] = action
    return exact, tuple(masked)


def profile_action(tag: Tag) -> str | None:
    """The E.1-1 basic-profile action for `tag` (e.g. "X", "Z/D"), None when not in the table."""
    exact, masked = profile_table()
    if int(tag) in exact:
        return exact[int(tag)]
    for group, element, group_mask, element_mask, action in masked:
        if tag.group & group_mask == group & group_mask and tag.elem & element_mask == element & element_mask:
            return action
    return None


# ---------------------------------------------------------------- de-identification


def deidentify(ds: Dataset, key: bytes, *, in_place: bool = False) -> DeidResult:
    """Apply the basic profile to `ds` (a copy unless `in_place`). Fails closed with DeidError."""
    if not isinstance(key, bytes) or len(key) < _MIN_KEY_CHARS:
        raise DeidKeyError("a de-identification key of at least 16 bytes is required")
    try:
        out = ds if in_place else copy.deepcopy(ds)
        burned_in = _burned_in(out)
        known = _known_identifiers(out)
        counts: Counter = Counter()
        _clean(out, _Context(key, known, counts))
        if getattr(out, "file_meta", None) is not None:
            _clean_meta(out, _Context(key, known, counts))
        _mark(out)
        for _ in out.iterall():  # every kept element must parse: fail closed, never pass on junk
            pass
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's messages may quote values: never pass them on
        raise DeidError(f"the DICOM object could not be de-identified ({type(exc).__name__})") from None
    return DeidResult(out, burned_in, dict(counts))


@dataclass(frozen=True)
class _Context:
    key: bytes
    known: tuple[str, ...]  # the object's own identifiers, masked wherever free text repeats them
    counts: Counter


def _clean(ds: Dataset, ctx: _Context) -> None:
    for tag in list(ds.keys()):
        tag = Tag(tag)
        if tag.is_private:
            del ds[tag]
            ctx.counts["removed"] += 1
            continue
        vr = _vr(ds.get_item(tag), tag)
        action = profile_action(tag)
        if vr == "SQ":
            _sequence(ds, tag, _SQ_RESOLVED.get(action, "CLEAN") if action else "CLEAN", ctx)
        elif action is None:
            _keep(ds, tag, vr, ctx)
        else:
            _apply(ds, tag, vr, _RESOLVED.get(action, action), ctx)


def _apply(ds: Dataset, tag: Tag, vr: str, action: str, ctx: _Context) -> None:
    if action == "X":
        del ds[tag]
        ctx.counts["removed"] += 1
    elif action == "Z" or (action == "U" and vr != "UI"):
        empty = "" if vr in _DUMMY else None  # what pydicom itself reads for an empty value
        ds[tag] = DataElement(tag, vr, empty, validation_mode=pydicom_config.IGNORE)
        ctx.counts["emptied"] += 1
    elif vr == "UI":  # D or U on a UID
        _remap(ds, tag, ctx)
    elif action == "D":
        ds[tag] = DataElement(tag, vr, _dummy(ds, tag, vr, ctx.key),
                              validation_mode=pydicom_config.IGNORE)
        ctx.counts["dummy"] += 1
    else:
        raise DeidError(f"unknown profile action {action!r}")


def _dummy(ds: Dataset, tag: Tag, vr: str, key: bytes):
    if tag == _PATIENT_ID:
        return _pseudonym_id(next(iter(_raw_strings(ds.get_item(tag))), ""), key)
    if vr in _NUMERIC:
        return 0
    return _DUMMY.get(vr, b"\x00\x00")  # binary VRs: an even-length placeholder


def _sequence(ds: Dataset, tag: Tag, action: str, ctx: _Context) -> None:
    if action == "X":
        del ds[tag]
        ctx.counts["removed"] += 1
    elif action == "Z":
        ds[tag] = DataElement(tag, "SQ", Sequence([]))
        ctx.counts["emptied"] += 1
    else:  # converting a sequence parses its items; their elements stay raw until cleaned
        for item in ds[tag].value:
            _clean(item, ctx)


def _keep(ds: Dataset, tag: Tag, vr: str, ctx: _Context) -> None:
    if vr == "UI" and not _protected_uid(tag, ds.get_item(tag)):
        _remap(ds, tag, ctx)
    elif vr in _FREE_TEXT:
        _clean_text(ds, tag, vr, ctx)


def _protected_uid(tag: Tag, element) -> bool:
    """Class and transfer-syntax UIDs, and UIDs of the standard's registry, name no instance."""
    keyword = keyword_for_tag(tag)
    if keyword.endswith("ClassUID") or keyword in ("TransferSyntaxUID", "CodingSchemeUID",
                                                    "ImplementationClassUID"):
        return True
    return all(uid in UID_dictionary for uid in _raw_strings(element))


def _remap(ds: Dataset, tag: Tag, ctx: _Context) -> None:
    uids = [remap_uid(uid, ctx.key) for uid in _raw_strings(ds.get_item(tag)) if uid]
    value = uids[0] if len(uids) == 1 else (uids or None)
    ds[tag] = DataElement(tag, "UI", value, validation_mode=pydicom_config.IGNORE)
    ctx.counts["uid"] += 1


def _clean_text(ds: Dataset, tag: Tag, vr: str, ctx: _Context) -> None:
    text = _decoded(ds, ds.get_item(tag))
    if not text.strip():
        return
    cleaned = mask_phi(text, ctx.known) if len(text) <= _MAX_CLEAN_CHARS else ""
    if cleaned != text:
        ds[tag] = DataElement(tag, vr, cleaned, validation_mode=pydicom_config.IGNORE)
        ctx.counts["cleaned"] += 1


def _clean_meta(ds: Dataset, ctx: _Context) -> None:
    meta = ds.file_meta
    for tag in _META_REMOVE:
        if tag in meta:
            del meta[tag]
            ctx.counts["removed"] += 1
    sop_uid = next(iter(_raw_strings(ds.get_item("SOPInstanceUID"))), "")
    if sop_uid:  # the meta copy must equal the (already remapped) dataset value
        meta[Tag(0x0002, 0x0003)] = DataElement(0x00020003, "UI", sop_uid,
                                               validation_mode=pydicom_config.IGNORE)
    elif "MediaStorageSOPInstanceUID" in meta:
        _remap(meta, Tag(0x0002, 0x0003), ctx)


def _mark(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = list(METHOD)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    ds.LongitudinalTemporalInformationModified = "REMOVED"  # dates were emptied or replaced
    ds.preamble = bytes(128)  # the preamble can carry an executable: never pass one on


# ---------------------------------------------------------------- reading values safely


def _vr(element, tag: Tag) -> str:
    vr = getattr(element, "VR", None)
    if vr and vr != "UN":
        return str(vr)
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def _raw_strings(element) -> list[str]:
    """The element's values as ASCII strings, without pydicom's (value-quoting) validation."""
    if element is None or element.value is None:
        return []
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        parts = bytes(value).decode("ascii", "replace").split("\\")
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    return [p.strip("\x00 ") for p in parts]


def _decoded(ds: Dataset, element) -> str:
    if element is None or element.value is None:
        return ""
    if not isinstance(element.value, (bytes, bytearray)):
        return str(element.value)
    encodings = convert_encodings(_raw_strings(ds.get_item("SpecificCharacterSet")) or None)
    return decode_bytes(bytes(element.value), encodings, {0x5E, 0x3D, 0x5C}).strip("\x00 ")


def _burned_in(ds: Dataset) -> str:
    flag = (_raw_strings(ds.get_item("BurnedInAnnotation")) or [""])[0].upper()
    if flag in ("YES", "NO"):
        return flag.lower()
    modality = (_raw_strings(ds.get_item("Modality")) or [""])[0].upper()
    sop_class = (_raw_strings(ds.get_item("SOPClassUID")) or [""])[0]
    if modality in _BURNED_IN_MODALITIES or sop_class.startswith(_SECONDARY_CAPTURE):
        return "possible"
    return "unknown"


def _known_identifiers(ds: Dataset) -> tuple[str, ...]:
    # Short values ("M", "1") would mask ordinary words; identifiers are longer.
    texts = (_decoded(ds, ds.get_item(keyword)) for keyword in _CANARY_KEYWORDS)
    return tuple(text for text in texts if len(text) >= 3)


def study_identity(ds: Dataset) -> StudyIdentity:
    """The original Patient/Study identifiers of `ds` (read before de-identifying it)."""
    values = {}
    for keyword in IDENTITY_KEYWORDS:
        text = _decoded(ds, ds.get_item(keyword))
        if text:
            values[keyword] = text
    return StudyIdentity(values)
