"""The retrieval the app offers: similar prior cases beside a draft, MedQuAD passages for education.

Both indexes are built once, by `python -m assistant prepare` (so by `make demo`), into the data
folder and then reused: `index-iu` (IU X-ray training reports, text side) and `index-medquad`
(MedQuAD answers of the training split, so an evaluation on held-out questions never retrieves its
own answer). A build runs in a temporary sibling folder that is renamed into place: an interrupted
or concurrent build never leaves half an index where the app looks. The app only opens indexes;
it never builds one (a start or a test must not spend minutes embedding).

Gradio-free; `app.py` and `app_report.py` wire it to the UI.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AssistantConfig
from .phi import mask_phi
from .retrieval import CaseIndex, CaseIndexError, EmbedderSpec, IndexSpec, SearchResults, SimilarCase, \
    open_case_store
from .retrieval_io import MANIFEST, file_sha256
from .retrieval_passages import Passage, PassageIndex, load_medquad, medquad_split, passages_from_records
from .retrieval_sources import iu_cases, iu_studies
from .vision import TOWER_FILE, resolve_weights

CASE_INDEX, PASSAGE_INDEX = "index-iu", "index-medquad"
CASE_HEADERS = ["case", "similarity", "key findings", "report"]
SIMILAR_K = 3
# MedQuAD questions are templated ("What is (are) Asthma ?"), so a user's question lands on the
# matching question; below this cosine the answer cites nothing rather than an unrelated page.
# On the full index (MiniLM): off-topic probes 0.20-0.27, a tangential hit 0.40, health questions
# and pasted reports 0.47-0.80.
PASSAGE_MIN_SIMILARITY = 0.45
PASSAGE_KEY_CHARS = 200  # question + opening of the passage: ~50 word pieces, 5x faster than whole passages
MAX_PASSAGE_CHARS = 600  # per passage in the education prompt: three fit in a CPU prefill budget
MAX_QUERY_CHARS = 2000

TextEmbedding = tuple[EmbedderSpec, Callable[[Sequence[str]], np.ndarray]]


def default_index(folder: str | Path, name: str) -> Path | None:
    """`folder/name` when an index was built there, else None."""
    path = Path(folder) / name
    return path if (path / MANIFEST).is_file() else None


def image_spec(config: AssistantConfig) -> EmbedderSpec | None:
    """The spec `index build` records for image vectors of this config's vision weights (same name
    and version rule as `cli_index.image_embedder`, checked by a test), or None without weights."""
    folder = resolve_weights(config.vision)
    if folder is None:
        return None
    return EmbedderSpec("vision:" + folder.name, "sha256:" + file_sha256(folder / TOWER_FILE)[:16],
                        int(config.vision.hidden_size))


# ---- building (prepare) ----------------------------------------------------------------------

def build_once(out: str | Path, build: Callable[[Path], None]) -> bool:
    """build(tmp) in a sibling temp folder renamed to `out`; False when `out` already holds an index."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CaseIndexError(f"{out} exists but holds no index: remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, out)  # atomic; replaces only an empty folder
        except OSError:
            if not (out / MANIFEST).is_file():  # not "someone else finished first": a real failure
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _remove_abandoned_builds(out: Path) -> None:
    """Temp folders of killed builds (their process is gone); a live concurrent build is left alone."""
    for folder in out.parent.glob(f".{out.name}.building-*"):
        pid = folder.name.split("-")[-2] if folder.name.count("-") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def build_case_index(out: str | Path, embedding: TextEmbedding, limit: int | None = None,
                     iu_dir: str | Path | None = None) -> bool:
    """The IU X-ray training reports (text vectors only: no IU images are available here)."""
    spec, embed = embedding

    def build(folder: Path) -> None:
        studies = iu_studies("train", iu_dir)[:limit]
        index = CaseIndex(IndexSpec(spec))
        index.add(iu_cases(studies, embed))
        index.save(folder)
    return build_once(out, build)


def passage_key(passage: Passage) -> str:
    return " ".join(f"{passage.question} {passage.text}".split())[:PASSAGE_KEY_CHARS]


def build_passage_index(out: str | Path, embedding: TextEmbedding, records: Sequence[dict] | None = None,
                        say: Callable[[str], None] = lambda message: None) -> bool:
    """MedQuAD training-split answers in passages, each embedded by its question and opening."""
    spec, embed = embedding

    def build(folder: Path) -> None:
        passages = passages_from_records(medquad_split(load_medquad() if records is None else records).train)
        vectors = _embed_with_progress(embed, [passage_key(p) for p in passages], say)
        index = PassageIndex(spec.name, spec.version, vectors.shape[1])
        index.add(passages, vectors)
        index.save(folder)
    return build_once(out, build)


def _embed_with_progress(embed, texts: list[str], say, batch: int = 256) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), batch):
        parts.append(np.asarray(embed(texts[start:start + batch]), np.float32))
        if (start // batch) % 10 == 9:
            say(f"  embedded {start + batch:,} of {len(texts):,} passages")
    return np.concatenate(parts)


def prepare_indexes(folder: str | Path, config: AssistantConfig, embedding: TextEmbedding | None = None) -> None:
    """Build the app's two indexes in `folder` unless they are there already (prepare / make demo)."""
    folder = Path(folder)
    missing = [name for name in (CASE_INDEX, PASSAGE_INDEX) if default_index(folder, name) is None]
    if not missing:
        _say(f"Indexes ready: {folder / CASE_INDEX}, {folder / PASSAGE_INDEX}")
        return
    if embedding is None:
        from .cli_index import text_embedder

        embedding = text_embedder(config)
    if CASE_INDEX in missing:
        _say("Building the similar-case index from the IU X-ray training reports (once, about a minute)…")
        build_case_index(folder / CASE_INDEX, embedding)
    if PASSAGE_INDEX in missing:
        _say("Building the MedQuAD passage index for patient education (once, 4-20 minutes on 2 cores)…")
        build_passage_index(folder / PASSAGE_INDEX, embedding, say=_say)
    _say(f"Indexes ready: {folder / CASE_INDEX}, {folder / PASSAGE_INDEX}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- searching (the app) ---------------------------------------------------------------------

class CaseFinder:
    """Similar prior cases from a case index, queried with text and (if the index has them and they
    come from this app's vision weights) the study's image vector."""

    def __init__(self, store, embedding: TextEmbedding, image: EmbedderSpec | None = None):
        self.store = store
        self.spec, self.embed = embedding
        has_images = store.stats()["vectors"]["image"] > 0
        self.uses_images = bool(has_images and image is not None and store.spec.image == image)

    @classmethod
    def open(cls, folder: str | Path, embedding: TextEmbedding, image: EmbedderSpec | None = None) -> "CaseFinder":
        return cls(open_case_store(folder, text=embedding[0]), embedding, image)

    def search(self, text: str = "", image_vector: np.ndarray | None = None, k: int = 3) -> SearchResults | None:
        """Top-k cases (PHI is masked before the text is embedded); None with nothing to search by."""
        text = mask_phi(" ".join((text or "").split()))[:MAX_QUERY_CHARS]
        text_vector = self.embed([text])[0] if text and self.store.spec.text else None
        image_vector = image_vector if self.uses_images else None
        if text_vector is None and image_vector is None:
            return None
        return self.store.search(text_vector=text_vector, image_vector=image_vector, k=k)


class PassageFinder:
    """Trusted consumer-health passages (MedQuAD) for a question, as (text, citation) pairs."""

    def __init__(self, index: PassageIndex, embedding: TextEmbedding, min_similarity: float = PASSAGE_MIN_SIMILARITY):
        self.index, self.min_similarity = index, min_similarity
        self.spec, self.embed = embedding

    @classmethod
    def open(cls, folder: str | Path, embedding: TextEmbedding) -> "PassageFinder":
        return cls(PassageIndex.load(folder, embedding[0].name, embedding[0].version), embedding)

    def find(self, question: str, k: int = 3) -> list[tuple[str, str]]:
        query = mask_phi(" ".join((question or "").split()))[:MAX_QUERY_CHARS]
        if not query:
            return []
        hits = self.index.search(self.embed([query])[0], k=k, min_similarity=self.min_similarity)
        return [(_excerpt(hit.passage.text), hit.citation) for hit in hits if hit.passage.url]


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_PASSAGE_CHARS else text[:MAX_PASSAGE_CHARS].rsplit(" ", 1)[0] + "…"


@dataclass(frozen=True)
class Retrieval:
    """What the app can retrieve; a missing part is None and `notes` say why (shown in the UI)."""

    cases: CaseFinder | None = None
    passages: PassageFinder | None = None
    notes: tuple[str, ...] = ()


def open_retrieval(config: AssistantConfig, case_dir: str | Path | None, passage_dir: str | Path | None,
                   embedding: TextEmbedding | None = None) -> Retrieval:
    """Open the indexes that are given (raising CaseIndexError for a broken one); the text embedder
    loads only when there is an index to query."""
    if case_dir is None and passage_dir is None:
        return Retrieval(notes=(NO_INDEX,))
    if embedding is None:
        from .cli_index import text_embedder

        embedding = text_embedder(config)
    cases = CaseFinder.open(case_dir, embedding, image_spec(config)) if case_dir else None
    passages = PassageFinder.open(passage_dir, embedding) if passage_dir else None
    return Retrieval(cases, passages, () if cases and passages else (NO_INDEX,))


@dataclass(frozen=True)
class CaseLookup:
    """Similar cases for the panel beside the draft: the cases, one line saying what was searched
    and what came of it, and the table rows."""

    cases: tuple[SimilarCase, ...]
    note: str
    rows: list[list[str]]


def find_similar(finder: CaseFinder | None, indication: str = "", draft: str = "",
                 study_vector: Callable[[], np.ndarray | None] = lambda: None, k: int = SIMILAR_K) -> CaseLookup:
    """Search the prior cases for a study.

    Query choice: an image vector (when the index has them, from this app's encoder) is the only
    query independent of what the model wrote. The IU index has text only (no IU images exist
    here), so text carries the search: the indication, plus the drafted findings once there is a
    draft, since the draft is the only text that describes this image. Cases found through the
    draft can echo its mistakes, so the note says what was searched by.
    """
    if finder is None:
        return CaseLookup((), NO_INDEX, [])
    text = " ".join(part.strip() for part in (indication, draft) if part and part.strip())
    vector = study_vector() if finder.uses_images else None
    results = finder.search(text, vector, k)
    if results is None:
        return CaseLookup((), "Nothing to search similar cases by yet: add an indication, or draft the report first.", [])
    by = _searched_by(bool(indication and indication.strip()), bool(draft and draft.strip()), vector is not None)
    if not results.found:
        best = f"the most similar scores {results.best_similarity:.2f}, " if results.best_similarity is not None else ""
        return CaseLookup((), f"No close prior case found ({best}below the {results.threshold:.2f} threshold). {by}", [])
    note = (f"{len(results)} similar prior case(s), similarity ≥ {results.threshold:.2f}. {by} They are other "
            "patients' reports, for reference only; not a diagnosis.")
    return CaseLookup(results.cases, note, case_rows(results.cases))


def _searched_by(indication: bool, draft: bool, image: bool) -> str:
    parts = [name for name, used in (("the image", image), ("the indication", indication),
                                     ("the drafted findings", draft)) if used]
    return "Searched by " + " and ".join(parts) + "."


def case_rows(cases: Sequence[SimilarCase]) -> list[list[str]]:
    return [[case.case_id, f"{case.similarity:.2f}", ", ".join(case.findings) or "none labelled",
             " ".join(case.report.split())] for case in cases]


NO_INDEX = ("An index is missing: run `python -m assistant prepare` once (it builds the similar-case and "
            "patient-education indexes), or start the app with --index / --passages.")
