"""Quality metrics, defined exactly as the leaderboards we compare against define them.

- R2Gen-style IU X-ray papers: reports cleaned by R2Gen's `clean_report_iu_xray` (lowercased,
  punctuation stripped, sentences joined with " . "), then pycocoevalcap's scorers on
  `{study: [text]}` dicts: corpus BLEU-1..4 (closest reference length), METEOR 1.5 (Java),
  ROUGE-L (LCS F-measure, beta 1.2, averaged over studies) and CIDEr-D.
- ReXrank: "BLEU" is the mean over studies of sentence-level BLEU-2 as CXR-Report-Metric computes
  it with fast_bleu (NLTK smoothing method 1, lowercased text with "." split off).
- Clinical efficacy: the CheXpert-style rule labeler's 14-label F1 (micro and macro).
- Patient education: ROUGE-L against a reference answer and the Flesch-Kincaid grade.
- EHR summaries: the fraction of medications/conditions a summary names that exist in the record,
  and the coverage of the record's active problems.

Every function here is pure (same input, same output) so the tests can pin hand-computed values.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .labeler import LABELS, finding_f1

COCO_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
URGENCY_RANK = {"none": 0, "urgent": 1, "emergency": 2}


# ---- R2Gen / pycocoevalcap ---------------------------------------------------------------------

def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU X-ray normalisation, character for character (quirks included, so scores match).

    The character class `[.,?;*!%^&_+():-\\[\\]{}]` holds the range `:-[`, so `< = > @` and capitals
    go too; the `!= []` test in R2Gen never drops empty sentences, so neither does this.
    """
    sentences = (report.replace("..", ".").replace("..", ".").replace("..", ".").replace("1. ", "")
                 .replace(". 2. ", ". ").replace(". 3. ", ". ").replace(". 4. ", ". ").replace(". 5. ", ". ")
                 .replace(" 2. ", ". ").replace(" 3. ", ". ").replace(" 4. ", ". ").replace(" 5. ", ". ")
                 .strip().lower().split(". "))
    cleaned = [re.sub(r"[.,?;*!%^&_+():-\[\]{}]", "",
                      s.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower())
               for s in sentences]
    return " . ".join(cleaned) + " ."


def coco_scores(references: Sequence[str], hypotheses: Sequence[str], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr over R2Gen-cleaned texts (pycocoevalcap, as R2Gen calls it).

    METEOR needs Java; without it (or if the jar fails) METEOR is None and `METEOR_error` says why.
    CIDEr's document frequencies come from the scored references, so a subset scores differently
    from the full split.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _same_length(references, hypotheses)
    if not references:
        raise ValueError("nothing to score: no references")
    # Newlines (IU reports have none; generated text may) become spaces before R2Gen's cleaning.
    gts = {i: [clean_report_iu_xray(" ".join(text.split()))] for i, text in enumerate(references)}
    res = {i: [clean_report_iu_xray(" ".join(text.split()))] for i, text in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU_{n + 1}": float(score) for n, score in enumerate(bleu)}
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["METEOR"], error = meteor_score(gts, res) if meteor else (None, "not requested")
    if error:
        out["METEOR_error"] = error
    return {key: out[key] for key in (*COCO_KEYS, "METEOR_error") if key in out}


def meteor_score(gts: Mapping, res: Mapping, timeout: float = 900.0) -> tuple[float | None, str | None]:
    """METEOR 1.5 exactly as pycocoevalcap runs it (its jar, `-l en -norm`, its paraphrase table;
    offline), through our own pipe handling: pycocoevalcap's wrapper desynchronises on a newline
    and then deadlocks on its lock, and has no timeout. Returns (score, None) or (None, why)."""
    if shutil.which("java") is None:
        return None, "java not found on PATH (METEOR 1.5 is a Java program)"
    spec = importlib.util.find_spec("pycocoevalcap.meteor.meteor")
    jar = Path(spec.origin).with_name("meteor-1.5.jar") if spec and spec.origin else None
    if jar is None or not jar.is_file():
        return None, "pycocoevalcap's meteor-1.5.jar not found"
    pairs = [([_meteor_text(r) for r in gts[key]], _meteor_text(res[key][0])) for key in gts]
    try:
        return _run_meteor(jar, pairs, timeout), None
    except (OSError, ValueError, RuntimeError) as err:
        return None, f"METEOR failed: {err}"


def _meteor_text(text: str) -> str:
    return " ".join(text.replace("|||", "").split())  # one line per segment: the jar's protocol


def _run_meteor(jar: Path, pairs: list[tuple[list[str], str]], timeout: float) -> float:
    """SCORE each segment for its statistics, then EVAL them all: the aggregate corpus METEOR."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(["java", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
                                cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        watchdog = threading.Timer(timeout, proc.kill)  # a hung JVM must not hang the evaluation
        watchdog.start()
        try:
            stats = [_ask(proc, " ||| ".join(("SCORE", *refs, hyp)), stderr) for refs, hyp in pairs]
            answers = [_ask(proc, " ||| ".join(("EVAL", *stats)), stderr)]
            answers += [_read(proc, stderr) for _ in pairs]  # per-segment scores, then the aggregate
            return float(answers[-1])
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def _ask(proc: subprocess.Popen, line: str, stderr) -> str:
    proc.stdin.write((line + "\n").encode("utf-8"))
    proc.stdin.flush()
    return _read(proc, stderr)


def _read(proc: subprocess.Popen, stderr) -> str:
    line = proc.stdout.readline().decode("utf-8").strip()
    if not line:
        stderr.seek(0)
        tail = stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the METEOR process stopped ({tail[0][:200]})")
    return line


# ---- ReXrank BLEU-2 ----------------------------------------------------------------------------

def rexrank_tokens(text: str) -> list[str]:
    """CXR-Report-Metric's `prep_reports`: lowercase, split "." off, split on single spaces."""
    return [token for token in str(text).lower().replace(".", " .").split(" ") if token != ""]


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], max_n: int = 2) -> float:
    """fast_bleu/NLTK sentence BLEU with one reference, uniform weights and smoothing method 1.

    Method 1 replaces a zero n-gram match count by 0.1 (over the same denominator); no unigram
    match at all scores 0; brevity penalty as in BLEU.
    """
    if not hypothesis:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(_ngrams(hypothesis, n))
        ref = Counter(_ngrams(reference, n))
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = max(1, sum(hyp.values()))
        if matches == 0 and n == 1:
            return 0.0
        log_sum += math.log((matches or 0.1) / total) / max_n
    ref_len, hyp_len = len(reference), len(hypothesis)
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return penalty * math.exp(log_sum)


def rexrank_bleu2(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """ReXrank's "BLEU" column: the mean per-study BLEU-2."""
    _same_length(references, hypotheses)
    scores = [sentence_bleu(rexrank_tokens(r), rexrank_tokens(h)) for r, h in zip(references, hypotheses)]
    return sum(scores) / len(scores) if scores else 0.0


def _ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ---- clinical efficacy -------------------------------------------------------------------------

def clinical_f1(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Micro and macro precision/recall/F1 over the 14 CheXpert labels, plus per-label F1.

    R2Gen convention: only label 1 is positive (uncertain counts as negative).
    """
    scores = finding_f1(references, hypotheses)
    keys = [f"{avg}_{m}" for avg in ("micro", "macro") for m in ("precision", "recall", "f1")]
    return {**{key: scores[key] for key in keys},
            "per_label_f1": {label: scores["per_label"][label]["f1"] for label in LABELS},
            "per_label_support": {label: scores["per_label"][label]["support"] for label in LABELS}}


# ---- patient education -------------------------------------------------------------------------

def simple_tokens(text: str) -> list[str]:
    """Lowercased word tokens, punctuation dropped (for answers, which R2Gen cleaning does not fit)."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("’", "'"))


def rouge_l(reference: str, hypothesis: str, beta: float = 1.2) -> float:
    """ROUGE-L F-measure with pycocoevalcap's beta (1.2): LCS recall weighted over precision."""
    ref, hyp = simple_tokens(reference), simple_tokens(hypothesis)
    lcs = _lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def count_syllables(word: str) -> int:
    """English syllables by rule (vowel groups, silent final e/es/ed); an estimate, like every FK tool."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if len(w) <= 3:
        return 1
    if w.endswith("ed") and w[-3] not in "td":
        w = w[:-2]  # "jumped", "played": the -ed is not voiced
    elif w.endswith("es") and not re.search(r"(?:[sxz]|ch|sh|ce|ge)es$", w):
        w = w[:-2]  # "makes", "lines" (but "boxes", "causes" keep it)
    elif w.endswith("e") and not re.search(r"(?:[^aeiouy]le|ee)$", w):
        w = w[:-1]  # silent e ("make"), but "table" and "free" keep their vowel
    return max(1, len(re.findall(r"[aeiouy]+", w.lstrip("y"))))


def flesch_kincaid_grade(text: str) -> float | None:
    """0.39 x words/sentence + 11.8 x syllables/word - 15.59 (Kincaid et al., 1975); None if no words."""
    words = re.findall(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*", text)
    if not words:
        return None
    sentences = max(1, len([s for s in re.split(r"[.!?]+(?:\s+|$)|\n\s*\n", text) if re.search(r"\w", s)]))
    syllables = sum(count_syllables(word) for word in words)
    return 0.39 * len(words) / sentences + 11.8 * syllables / len(words) - 15.59


def education_scores(references: Sequence[str], answers: Sequence[str]) -> dict:
    """Mean ROUGE-L against the reference answers and mean FK grade of the answers."""
    _same_length(references, answers)
    grades = [g for g in map(flesch_kincaid_grade, answers) if g is not None]
    return {"ROUGE_L": sum(map(rouge_l, references, answers)) / len(answers) if answers else None,
            "fk_grade_mean": sum(grades) / len(grades) if grades else None,
            "n": len(answers)}


# ---- EHR summaries -----------------------------------------------------------------------------

def normalise_item(text: str) -> str:
    """Record entries and summary phrases on one footing: Synthea's "(disorder)" tags, case, punctuation."""
    text = re.sub(r"\((?:disorder|finding|situation|procedure|morphologic abnormality)\)", " ", text.lower())
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text))


def items_match(a: str, b: str, threshold: float = 0.85) -> bool:
    """Fuzzy, case-insensitive: equal, one contains the other as whole words ("lisinopril" in
    "lisinopril 10 mg oral tablet"), or a near-spelling (difflib ratio >= threshold, for typos)."""
    x, y = normalise_item(a), normalise_item(b)
    if not x or not y:
        return False
    short, long = sorted((x, y), key=len)
    if f" {short} " in f" {long} ":
        return True
    return difflib.SequenceMatcher(None, x, y).ratio() >= threshold


def mentioned_items(summary: str, lexicon: Iterable[str], threshold: float = 0.85) -> list[str]:
    """Lexicon entries the summary names: whole-word containment, or a near-spelling of a window
    of the summary as long as the entry (so "lisinoprill" still counts as naming lisinopril)."""
    words = normalise_item(summary).split()
    text = f" {' '.join(words)} "
    found = []
    for entry in dict.fromkeys(lexicon):
        target = normalise_item(entry)
        if not target:
            continue
        size = len(target.split())
        windows = (" ".join(words[i:i + size]) for i in range(max(0, len(words) - size + 1)))
        if f" {target} " in text or any(difflib.SequenceMatcher(None, target, w).ratio() >= threshold
                                         for w in windows):
            found.append(entry)
    return found


def summary_faithfulness(named: Sequence[str], record_items: Sequence[str]) -> dict:
    """Of the medications/conditions a summary names, the fraction that exist in the record.

    `named` comes from the summary (its listed items, or `mentioned_items` over a lexicon of every
    medication/condition name); anything without a fuzzy match in `record_items` is unsupported.
    """
    unsupported = [item for item in named if not any(items_match(item, known) for known in record_items)]
    supported = len(named) - len(unsupported)
    return {"named": len(named), "supported": supported, "unsupported": unsupported,
            "supported_fraction": supported / len(named) if named else None}


def problem_coverage(summary: str, active_problems: Sequence[str]) -> dict:
    """Fraction of the record's active problems that the summary mentions (fuzzy, case-insensitive)."""
    covered = mentioned_items(summary, active_problems)
    missing = [problem for problem in active_problems if problem not in covered]
    return {"active": len(active_problems), "covered": len(active_problems) - len(missing), "missing": missing,
            "coverage": (len(active_problems) - len(missing)) / len(active_problems) if active_problems else None}


# ---- triage ------------------------------------------------------------------------------------

def triage_metrics(expected: Sequence[str], predicted: Sequence[str], categories: Sequence[str | None],
                   flagged_categories: Sequence[Iterable[str]]) -> dict:
    """Emergency recall, urgent accuracy, false-alarm rate on "none", per-category recall.

    Levels are "emergency" | "urgent" | "none". A vignette of a category is recalled when a flag of
    that category fires at its expected level or a more urgent one (over-triage is the safe error).
    """
    _same_length(expected, predicted)
    pairs = list(zip(expected, predicted))

    def rate(want: str, ok) -> float | None:
        got = [p for e, p in pairs if e == want]
        return sum(map(ok, got)) / len(got) if got else None

    per_category: dict[str, list[bool]] = {}
    for want, got, category, flagged in zip(expected, predicted, categories, flagged_categories):
        if category and want != "none":
            hit = category in set(flagged) and URGENCY_RANK[got] >= URGENCY_RANK[want]
            per_category.setdefault(category, []).append(hit)
    return {
        "emergency_recall": rate("emergency", lambda p: p == "emergency"),
        "urgent_accuracy": rate("urgent", lambda p: p == "urgent"),
        "urgent_flagged_any": rate("urgent", lambda p: p != "none"),
        "false_alarm_rate": rate("none", lambda p: p != "none"),
        "per_category_recall": {c: sum(hits) / len(hits) for c, hits in sorted(per_category.items())},
        "confusion": {e: dict(Counter(p for x, p in pairs if x == e)) for e in URGENCY_RANK},
        "counts": dict(Counter(expected)),
    }


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} references but {len(b)} hypotheses")
