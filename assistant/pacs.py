"""The hospital's PACS over DICOMweb (dicomweb-client): QIDO-RS search, WADO-RS pull, STOW-RS push.

This module sits on the trusted side of the de-identification boundary: it handles the original
files and identifiers. What it hands on is de-identified by the callers' usual path: pulled files
go through `dicom.read_scan` (keyed pseudonyms, safe tags only), and a report goes back only as
`export.for_pacs` builds it (refiled into the original study after a keyed-hash check).

Privacy: QIDO answers carry PatientName/PatientID and WADO answers whole headers. Nothing here
logs them, `StudyMatch` keeps only the study UID (needed to pull) and non-identifying counts, and
every `PacsError` is one line without query strings, URLs with credentials or server text.
dicomweb-client's own log lines quote study UIDs and query URLs (PatientID=...), so its logger is
held at CRITICAL; urllib3's DEBUG request lines lose their targets and `retrying`'s warnings
their tracebacks (library settings, set once at import, as `deid` does for pydicom).

Hostile answers: the instance list (QIDO) is checked before anything is retrieved (image count,
pixel count against `DicomConfig.max_pixels`), and each retrieved instance must belong to the
requested study, so a misbehaving PACS cannot mix another patient's images into a draft. The
WADO payload itself is parsed by pydicom inside dicomweb-client before `read_scan` applies its
own byte caps: the PACS is trusted not to send decompression bombs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from assistant.config import DicomConfig
from assistant.deid import StudyIdentity, study_identity

__all__ = ["PacsError", "Pacs", "StudyMatch", "Instance", "ENV_USER", "ENV_PASSWORD", "ENV_TOKEN"]

_REQUEST_LINE = re.compile(r'"([A-Z]+) \S+ (HTTP/[0-9.]+)"')


class _WithholdTargets(logging.Filter):
    """urllib3 logs each request line at DEBUG with its target: /studies/<UID>?PatientID=..."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _REQUEST_LINE.sub(r'"\1 <withheld> \2"', record.getMessage()), None
        return True


class _WithholdRetryDetails(logging.Filter):
    """`retrying` logs each failed attempt with its traceback, whose text quotes the request URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "a request failed and is retried (details withheld)", None
        record.exc_info = record.exc_text = None
        return True


logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
logging.getLogger("urllib3.connectionpool").addFilter(_WithholdTargets())
logging.getLogger("retrying").addFilter(_WithholdRetryDetails())

# Credentials come from the environment, never from command-line arguments (visible in `ps`).
ENV_USER, ENV_PASSWORD, ENV_TOKEN = "ASSISTANT_PACS_USER", "ASSISTANT_PACS_PASSWORD", "ASSISTANT_PACS_TOKEN"
_ANY_SYNTAX = (("application/dicom", "*"),)  # as stored: no server-side transcoding (J2K stays J2K)
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
_DATE = re.compile(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}")  # DA, or a QIDO range
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")
_STUDY_FIELDS = ("StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                 "NumberOfStudyRelatedInstances")
_INSTANCE_FIELDS = ("SeriesInstanceUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "NumberOfFrames",
                    "SamplesPerPixel")
_IDENTITY_FIELDS = ("IssuerOfPatientID", "StudyID", "ReferringPhysicianName")  # beyond QIDO's defaults


class PacsError(ValueError):
    """A one-line, identifier-free reason the PACS call failed. A ValueError so that the CLI and
    the app show its text as it is (`cli.user_message`)."""


@dataclass(frozen=True)
class StudyMatch:
    """One QIDO study hit: only what is needed to pick and pull it (no names, ids or dates)."""

    study_uid: str = field(repr=False)  # the original UID: shown to the trusted user, never logged
    modalities: tuple[str, ...]
    n_series: int | None
    n_instances: int | None


@dataclass(frozen=True)
class Instance:
    series_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    modality: str | None
    pixels: int | None  # rows * columns * samples * frames; None for non-images (SR, KO, PR)


class Pacs:
    """A DICOMweb endpoint such as Orthanc's `http://127.0.0.1:8042/dicom-web`.

    `timeout` (seconds) bounds connecting and each read. No I/O happens until the first call.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, user: str | None = None,
                 password: str | None = None, token: str | None = None) -> None:
        self.url = _public_url(url)
        session = requests.Session()
        if user:
            session.auth = (user, password or "")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self._client = DICOMwebClient(url.rstrip("/"), session=session, headers=headers, timeout=timeout)
        except ValueError:
            raise PacsError("the PACS URL is malformed (e.g. http://127.0.0.1:8042/dicom-web)") from None
        # dicomweb-client retries every failure (refused connection and timeout included, not only
        # 503/429), by default 5 times over ~30 s: one retry after 0.5 s rides out a blip and
        # still fails fast. `timeout` is per attempt, so a silent server takes about twice that.
        self._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)

    @classmethod
    def from_env(cls, url: str, *, timeout: float = 30.0,
                 environ: Mapping[str, str] = os.environ) -> "Pacs":
        """Credentials from $ASSISTANT_PACS_USER/$ASSISTANT_PACS_PASSWORD or $ASSISTANT_PACS_TOKEN."""
        return cls(url, timeout=timeout, user=environ.get(ENV_USER), password=environ.get(ENV_PASSWORD),
                   token=environ.get(ENV_TOKEN))

    # ---- QIDO-RS -------------------------------------------------------------------------------
    def search(self, *, patient_id: str | None = None, study_date: str | None = None,
               modality: str | None = None, accession: str | None = None, limit: int = 50) -> list[StudyMatch]:
        """Studies matching every given filter (study_date: YYYYMMDD or a range YYYYMMDD-YYYYMMDD)."""
        filters = _search_filters(patient_id, study_date, modality, accession)
        with _errors(self.url, "searching for studies"):
            hits = self._client.search_for_studies(search_filters=filters, fields=_STUDY_FIELDS, limit=limit)
        return [_study_match(ds) for ds in _datasets(hits, self.url)]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[Instance]:
        """Every instance of a study (or one series of it); PacsError when the study is unknown."""
        _check_uid(study_uid, "study")
        if series_uid is not None:
            _check_uid(series_uid, "series")
        with _errors(self.url, "listing the study's instances"):
            hits = self._client.search_for_instances(study_uid, series_uid, fields=_INSTANCE_FIELDS)
        found = [_instance(ds) for ds in _datasets(hits, self.url)]
        if not found:
            raise PacsError("no such study on the PACS (check the StudyInstanceUID)" if series_uid is None
                            else "no such series in that study on the PACS")
        return found

    def study_identity(self, study_uid: str) -> StudyIdentity:
        """The study's original Patient/Study identifiers as the PACS holds them, for
        `export.for_pacs`. Keep the result in memory; never store or log it."""
        _check_uid(study_uid, "study")
        with _errors(self.url, "reading the study's identifiers"):
            hits = self._client.search_for_studies(search_filters={"StudyInstanceUID": study_uid},
                                                   fields=_IDENTITY_FIELDS)
        matches = [ds for ds in _datasets(hits, self.url) if str(ds.get("StudyInstanceUID", "")) == study_uid]
        if not matches:
            raise PacsError("no such study on the PACS (check the StudyInstanceUID)")
        return study_identity(matches[0])

    # ---- WADO-RS -------------------------------------------------------------------------------
    def pull(self, study_uid: str, folder: str | os.PathLike, *, series_uid: str | None = None,
             max_images: int | None = None, config: DicomConfig = DicomConfig()) -> list[Path]:
        """Write the study's images (not its SR/KO/PR objects) into `folder` as image-NNN.dcm.

        The files are the original, identifying DICOM: read them with `dicom.read_scan` (which
        de-identifies) and delete them after; `pulled` does both ends for you.
        """
        images = [i for i in self.instances(study_uid, series_uid) if i.pixels is not None]
        _check_images(images, max_images, config)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths = []
        for number, instance in enumerate(images, start=1):
            ds = self.retrieve(study_uid, instance)
            if str(ds.get("StudyInstanceUID", "")) != study_uid:
                for path in paths:
                    path.unlink(missing_ok=True)
                raise PacsError("the PACS answered with an instance of another study; nothing was kept")
            paths.append(_write(ds, folder / f"image-{number:03d}.dcm"))
        return paths

    @contextlib.contextmanager
    def pulled(self, study_uid: str, **options) -> Iterator[list[Path]]:
        """`pull` into a private temporary folder that is deleted afterwards, whatever happens."""
        folder = Path(tempfile.mkdtemp(prefix="pacs-"))  # mode 0700: the files carry PHI
        try:
            yield self.pull(study_uid, folder, **options)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def retrieve(self, study_uid: str, instance: Instance) -> Dataset:
        """One instance as stored (any transfer syntax), parsed."""
        with _errors(self.url, "retrieving an instance"):
            return self._client.retrieve_instance(study_uid, instance.series_uid, instance.sop_uid,
                                                  media_types=_ANY_SYNTAX)

    # ---- STOW-RS -------------------------------------------------------------------------------
    def push(self, ds: Dataset) -> None:
        """Store one object (the `export.for_pacs` SR) in its study; PacsError when refused."""
        study_uid = str(ds.get("StudyInstanceUID", ""))
        _check_uid(study_uid, "study")
        ds.preamble = bytes(128)  # the preamble can carry an executable: never pass one on
        with _errors(self.url, "storing the report"):
            # Posting to /studies/{uid} makes the server check that the object belongs there.
            answer = self._client.store_instances([ds], study_instance_uid=study_uid)
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reason = failed[0].get("FailureReason")
            raise PacsError(f"the PACS refused the report (failure reason {_hex(reason)})")


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """Library and network failures as one PacsError line. Their own texts are never used: they
    quote request URLs, and with them study UIDs and PatientID query parameters."""
    try:
        yield
    except PacsError:
        raise
    except requests.Timeout:
        raise PacsError(f"the PACS at {url} did not answer in time while {what}") from None
    except requests.ConnectionError:
        raise PacsError(f"cannot reach the PACS at {url} while {what} (is it running, is the URL right?)") from None
    except requests.HTTPError as exc:
        raise PacsError(_http_message(url, what, exc.response)) from None
    except requests.exceptions.JSONDecodeError:
        raise PacsError(f"{url} did not answer as a DICOMweb service while {what} (not DICOM JSON): "
                        "check the URL (Orthanc: .../dicom-web)") from None
    except InvalidDicomError:
        raise PacsError(f"the PACS sent something that is not DICOM while {what}") from None
    except (requests.RequestException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PacsError(f"unexpected answer from the PACS at {url} while {what} ({type(exc).__name__})") from None


def _http_message(url: str, what: str, response: requests.Response | None) -> str:
    code = getattr(response, "status_code", None)
    if code in (401, 403):
        return (f"the PACS at {url} refused access (HTTP {code}) while {what}: "
                f"check ${ENV_USER}/${ENV_PASSWORD} or ${ENV_TOKEN}")
    if code == 404:
        return f"not found on the PACS (HTTP 404) while {what}: check the StudyInstanceUID and the URL"
    return f"the PACS at {url} answered HTTP {code} while {what}"


def _public_url(url: str) -> str:
    """The URL as error messages show it: no user:password@, no query string."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PacsError("the PACS URL must start with http:// or https:// (e.g. http://127.0.0.1:8042/dicom-web)")
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise PacsError("the PACS URL has an invalid port") from None
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


def _search_filters(patient_id, study_date, modality, accession) -> dict[str, str]:
    if study_date and not _DATE.fullmatch(study_date):
        raise PacsError("study date must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if modality and not _CODE.fullmatch(modality.upper()):
        raise PacsError("modality must be a DICOM code such as CR, DX or CT")
    filters = {"PatientID": patient_id, "StudyDate": study_date,
               "ModalitiesInStudy": modality.upper() if modality else None, "AccessionNumber": accession}
    filters = {key: value for key, value in filters.items() if value}
    if not filters:
        raise PacsError("give at least one filter: patient id, study date, modality or accession number")
    return filters


def _check_uid(uid: str, what: str) -> None:
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        raise PacsError(f"not a DICOM {what} UID (digits and dots, at most 64 characters)")


def _datasets(hits, url: str) -> list[Dataset]:
    # A non-DICOMweb server (e.g. Orthanc's REST root, which lists ids as strings) answers JSON too.
    if not isinstance(hits, list) or not all(isinstance(hit, dict) for hit in hits):
        raise PacsError(f"{url} did not answer as a DICOMweb service (not DICOM JSON): "
                        "check the URL (Orthanc: .../dicom-web)")
    with _errors(url, "reading the PACS answer"):
        return [Dataset.from_json(hit) for hit in hits]


def _study_match(ds: Dataset) -> StudyMatch:
    return StudyMatch(study_uid=str(ds.get("StudyInstanceUID", "")),
                      modalities=tuple(str(m) for m in _values(ds, "ModalitiesInStudy")),
                      n_series=_int(ds, "NumberOfStudyRelatedSeries"),
                      n_instances=_int(ds, "NumberOfStudyRelatedInstances"))


def _instance(ds: Dataset) -> Instance:
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    pixels = None
    if rows and columns:
        pixels = rows * columns * (_int(ds, "SamplesPerPixel") or 1) * (_int(ds, "NumberOfFrames") or 1)
    modality = str(ds.get("Modality", "")) or None
    return Instance(series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
                    modality=modality, pixels=pixels)


def _check_images(images: list[Instance], max_images: int | None, config: DicomConfig) -> None:
    if not images:
        raise PacsError("the study holds no images (only reports or other non-image objects)")
    if max_images is not None and len(images) > max_images:
        raise PacsError(f"the study has {len(images)} images; at most {max_images} can be drafted "
                        "together: choose one series")
    if any(image.pixels > config.max_pixels for image in images):
        raise PacsError(f"an image of the study is larger than {config.max_pixels} pixel samples "
                        "(DicomConfig.max_pixels)")


def _write(ds: Dataset, path: Path) -> Path:
    ds.preamble = bytes(128)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _values(ds: Dataset, keyword: str) -> list:
    value = ds.get(keyword)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword)) if ds.get(keyword) not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _hex(value) -> str:
    try:
        return f"0x{int(value):04X}"
    except (TypeError, ValueError):
        return "unknown"
