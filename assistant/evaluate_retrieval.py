"""Similar-case retrieval quality on IU X-ray reports (text side; IU carries no images here).

Two measures, both through `CaseIndex` (exact inner-product search, the app's code path):
- report retrieval: index the R2Gen *test* findings, query with the same studies' impressions,
  recall@1/@5/@10 of the study's own findings (the protocol of benchmarks/retrieval.py's
  `iu.retrieval`; also with identical findings texts counted as the same report, since IU repeats
  normal reports verbatim). Chance: k / number of indexed findings.
- label agreement: index the R2Gen *train* reports as `index build --from-iu` does (PHI-masked,
  findings + impression), query with each test study's report, and compare the rule labeler's
  positive findings ("No Finding" counts as a label) of query and retrieved cases: precision@k =
  share of the top k that agree with the query (share a positive label, or both have none: the
  labeler marks some reports neither normal nor abnormal); exact@k = share with the identical
  label set. Chance: the same shares over the whole index (random retrieval).
Studies lacking findings or impression are skipped, as in the benchmark; `--limit N` keeps the
first N queries in annotation order (the indexes stay complete).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .labeler import label_report
from .phi import mask_phi
from .retrieval import Case, CaseIndex, EmbedderSpec, IndexSpec
from .retrieval_cases import positive_findings
from .retrieval_sources import IuStudy, embed_in_batches, iu_cases, iu_studies

RECALL_K, LABEL_K = (1, 5, 10), (1, 5, 10)
Embed = Callable[[Sequence[str]], np.ndarray]


def _index(spec: EmbedderSpec, cases: Sequence[Case]) -> CaseIndex:
    index = CaseIndex(IndexSpec(text=spec, min_similarity=-1.0))  # rank everything: quality, not thresholds
    index.add(cases)
    return index


def report_retrieval(test: Sequence[IuStudy], queries: Sequence[IuStudy], embed: Embed, spec: EmbedderSpec) -> dict:
    """Own-findings recall@k when the test findings are searched with the impressions."""
    cases = [Case(f"iu-{s.id}", s.findings, text_vector=v)
             for s, v in zip(test, embed_in_batches(embed, [s.findings for s in test]))]
    index = _index(spec, cases)
    text_of = {f"iu-{s.id}": " ".join(s.findings.split()) for s in test}
    vectors = embed_in_batches(embed, [s.impression for s in queries])
    ranked = [[c.case_id for c in index.search(text_vector=v, k=max(RECALL_K))] for v in vectors]
    own = [f"iu-{s.id}" for s in queries]
    out = {"n_indexed": len(test), "n_queries": len(queries)}
    for k in RECALL_K:
        out[f"recall_at_{k}"] = _mean([o in r[:k] for o, r in zip(own, ranked)])
        out[f"recall_at_{k}_identical_text_counts"] = _mean(
            [text_of[o] in {text_of[c] for c in r[:k]} for o, r in zip(own, ranked)])
        out[f"chance_at_{k}"] = k / len(test) if test else None
    return out


def label_agreement(train: Sequence[IuStudy], queries: Sequence[IuStudy], embed: Embed, spec: EmbedderSpec) -> dict:
    """Labeler agreement between each test report and the train cases retrieved for it."""
    index = _index(spec, iu_cases(train, embed))
    case_labels = {r.case_id: set(positive_findings(r.labels)) for r in index.records.values()}
    texts = [mask_phi(s.report) for s in queries]
    query_labels = [set(positive_findings(label_report(t))) for t in texts]
    vectors = embed_in_batches(embed, texts)
    found = [[set(c.findings) for c in index.search(text_vector=v, k=max(LABEL_K))] for v in vectors]
    everyone = list(case_labels.values())
    out = {"n_indexed": len(index), "n_queries": len(queries),
           "queries_with_a_finding": _mean([bool(q - {"No Finding"}) for q in query_labels]),
           "queries_without_labels": _mean([not q for q in query_labels])}
    for k in LABEL_K:
        out[f"precision_at_{k}"] = _mean([_share(q, f[:k], _overlaps) for q, f in zip(query_labels, found)])
        out[f"exact_at_{k}"] = _mean([_share(q, f[:k], _equal) for q, f in zip(query_labels, found)])
    out["chance_precision"] = _mean([_share(q, everyone, _overlaps) for q in query_labels])
    out["chance_exact"] = _mean([_share(q, everyone, _equal) for q in query_labels])
    return out


def _overlaps(a: set, b: set) -> bool:
    return bool(a & b) or a == b


def _equal(a: set, b: set) -> bool:
    return a == b


def _share(query: set, retrieved: Sequence[set], agree) -> float:
    return sum(agree(query, r) for r in retrieved) / len(retrieved) if retrieved else 0.0


def _mean(values: Sequence) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def run_retrieval(embed: Embed, spec: EmbedderSpec, limit: int | None) -> dict:
    timings, start = {}, time.perf_counter()
    test = [s for s in iu_studies("test") if s.findings and s.impression]
    train = iu_studies("train")
    queries = test[:limit] if limit is not None else test
    recall = report_retrieval(test, queries, embed, spec)
    timings["report_retrieval_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    labels = label_agreement(train, queries, embed, spec)
    timings["label_agreement_s"] = round(time.perf_counter() - start, 2)
    return {
        "dataset": {"name": "IU X-ray (Indiana University chest X-ray reports)", "split": "test (queries)",
                    "split_source": "R2Gen annotation (r2gen_iu_xray_annotation.json)", "order": "annotation order",
                    "n_split": len(test), "n_evaluated": len(queries), "n_train": len(train), "limit": limit,
                    "skipped": "test studies without findings or impression"},
        "protocol": __doc__.split("Two measures, ", 1)[1].strip(),
        "embedder": {"name": spec.name, "version": spec.version, "dim": spec.dim},
        "metrics": {"report_retrieval": recall, "label_agreement": labels},
        "timing": timings,
    }
