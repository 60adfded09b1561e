"""Deterministic red-flag escalation: recognise emergencies in text and say what to do, every time.

The model is small and can be talked into anything, so the escalation layer is plain code over a
clinician-reviewable rule file (`rules/red_flags.json`): the same text always gives the same
banner, and the banner is added *after* the model runs, so no prompt can remove it.

Matching is phrase/regex based with NegEx-style context (Chapman et al., 2001): a trigger such as
"no", "denies" or "history of" suppresses a match that falls inside its scope; the scope ends at
punctuation, at a conjunction such as "but", or at a new subject ("I", "she"...). Patterns that
carry their own negative ("can't breathe", "not breathing", "rash that doesn't fade") are
affirmative findings, because a trigger only counts when it starts before the match does.
Limits (documented in the tests): third-party and past events are only recognised through explicit
markers ("history of", "years ago", "died of"); anything else is escalated, as is any mention
the rules cannot place. Safety over false alarms.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DRAFT_LABEL = "AI-generated draft for clinician review — not a diagnosis."
DEFAULT_RULES_PATH = Path(__file__).with_name("rules") / "red_flags.json"
URGENCIES = ("emergency", "urgent")  # most urgent first: this order sorts flags and banners

_RULE_KEYS = {"id", "category", "patterns", "urgency", "message", "source", "requires_any", "unless_any"}
_TOP_KEYS = {"about", "rules"}
_URL = re.compile(r"https://[^\s;]+")
_BANNER_FOOTER = "This safety notice comes from fixed rules checked by code, not from the AI, and is not a diagnosis."
_BANNER_HEAD = {
    "emergency": "🚨 EMERGENCY — what you describe can be a sign of a medical emergency. "
                 "Act now; do not wait for the rest of this answer.",
    "urgent": "⚠️ URGENT — what you describe needs medical advice today.",
}
_BANNER = re.compile(r"(?:🚨 EMERGENCY|⚠️ URGENT) —.*?" + re.escape(_BANNER_FOOTER) + r"\s*", re.DOTALL)


class RulesError(ValueError):
    """The red-flag rule file is missing, malformed, or has a rule that cannot be used safely."""


@dataclass(frozen=True)
class RedFlag:
    rule_id: str
    category: str
    urgency: str
    matched: str  # the words that fired the rule, e.g. "chest pain + sweating"
    message: str
    source: str


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    urgency: str
    message: str
    source: str
    patterns: tuple[re.Pattern[str], ...]
    requires_any: tuple[tuple[re.Pattern[str], ...], ...] = ()
    unless_any: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True)
class RedFlagRules:
    rules: tuple[Rule, ...]
    path: str


# --- NegEx-style context lexicon -----------------------------------------------------------
# Kept in code, not in the rule file: it is grammar, shared by every rule, and tested as such.

def _words(pattern: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w'/])(?:" + pattern + r")(?![\w'/])", re.VERBOSE)


_NEGATION = _words(r"""no | not | non | never | nil | without | w/o | denies | denied | deny | denying
    | negative\ for | free\ of | absence\ of | absent | ruled\ out
    | (?:do|does|did|has|have|had|is|are|was|were)(?:n't|nt|\ not)
    | no\ longer\ (?:have|has|having|feel|feels|feeling|get|gets|getting|got|experienc\w*)""")
_HISTORY = _words(r"""history\ of | hx\ of | h/o | pmh | pmhx | past\ medical\ history(?:\ of)?
    | family\ history(?:\ of)? | fhx | fh\ of | previous(?:ly)? | prior | in\ the\ past
    | died\ (?:of|from|by|after) | passed\ away\ (?:from|of|after)
    | old(?=\ (?:mi|infarcts?|strokes?|heart\ attacks?|cva|tia|scar))""")
# "What is sepsis?" asks for a definition; the short scope keeps "what is this crushing pain" affirmed.
_DEFINITION = _words(r"what\ (?:is|are|causes|does)|define|definition\ of|meaning\ of")
_HYPOTHETICAL = _words(r"""(?:warning\ )?(?:signs?|symptoms?)\ (?:(?:can|may|might|often|usually
    |typically)\ )?(?:of|for|such\ as|like|include|includes|including)
    | guidance\ (?:on|for|about) | guidelines?\ (?:on|for|about)
    | such\ as | risks?\ (?:of|for) | risk\ factors?(?:\ for)? | prevent\w* | avoid\w*
    | reduce\ (?:my|the|your|his|her)\ (?:risk|chance)s?
    | if\ (?:you|someone|somebody|anyone|a\ person|a\ patient|the\ patient|a\ child|a\ baby)\ (?:\w+\ )?
    (?:has|have|had|get|gets|experiences?|notices?|is|are|develops?|feels?|shows?|starts?|becomes?)
    | in\ case\ of | what\ to\ do\ (?:if|when|in)
    | how\ (?:do|can|would|should|to)\ (?:(?:i|you|we|one)\ )?(?:tell|know|recogni[sz]e|spot|prevent|avoid
    |reduce|identify)
    | explain\w* | educat\w* | leaflet | teach\w* | learn(?:ing)?\ about | information\ (?:on|about)
    | tell\ me\ about | difference\ between | call\ (?:911|999|112)\ if | seek\ (?:\w+\ ){0,2}(?:help|care
    |attention)\ if
    | go\ to\ (?:a&e|the\ emergency\ department|the\ er|hospital)\ if | watch\ (?:out\ )?for | look\ out\ for
    | worried\ about\ (?:getting|having) | (?:scared|afraid|frightened)\ of\ (?:getting|having)""")
# Look-alikes of triggers that do not negate: "not sure", "never had a headache like this".
_PSEUDO = _words(r"""not\ sure | not\ certain | not\ only | not\ just | no\ idea | no\ doubt | no\ way | no\ one
    | nobody | no\ matter | never\ (?:felt|been|had\ it)\ (?:so|this) | not\ know | (?:don't|dont
    |do\ not)\ know | not\ getting\ better | not\ improving
    | not\ going\ away | not\ helping | not\ working | no\ better | no\ change | never\ mind | whether\ or\ not
    | if\ not | not\ to\ mention | no\ (?:reason|point)\ (?:to|in)
    | without\ (?:any\ )?(?:warning|reason|cause|trigger|stopping)
    | no\ longer(?!\ (?:have|has|having|feel|feels|feeling|get|gets|getting|got|experienc))
    | never\ (?:had|felt|experienced|been)\b[^.,;:!?\n]{0,40}?\b(?:like\ (?:this|it)|this\ bad|so\ bad|before)
    | (?:have|has|having|had|got|show\w*|with|experiencing|displaying|all)\ (?:(?:all|many|some|the|these|those
    |classic|typical|warning)\ )*(?:signs?|symptoms?)
    | (?:not|isn't|is\ not|wasn't|was\ not|no\ longer|stopped|aren't)\ (?:breathing|responding|responsive
    |waking|moving|making\ sense|able\ to|conscious)
    | (?:won't|will\ not|doesn't|does\ not|isn't|is\ not|not|can't|cannot|didn't|did\ not|don't
    |do\ not)\ (?:stop|stopping|fade|fading|blanch|go\ away|wake|want\ to)
    | (?:hasn't|haven't|has\ not|have\ not|not)\ (?:been\ able\ to|peed|weed|urinated|passed\ urine|moved
    |kicked|felt)""")
_POST = _words(r"""denied | absent | ruled\ out | resolved | not\ present | none | nil | gone\ away | went\ away
    | (?:has|have|had)\ (?:now\ |since\ |completely\ |all\ )?(?:gone|settled|stopped|resolved|eased|disappeared
    |cleared)(?=\ *(?:$|[.,;!?\n]|now|and|but|since))
    | (?:is|are|was|were)\ (?:now\ )?(?:gone|better|settled|resolved)
    | in\ the\ past | (?:(?:\d+|a|one|two|three|four|five|six|seven|eight|nine|ten|few|several|many
    |couple\ of)\ )?(?:months?|years?|decades?)\ ago
    | last\ (?:year|summer|winter|spring|autumn|fall|christmas) | in\ (?:19|20)\d\d
    | as\ a\ (?:child|kid|teen|teenager|baby|toddler)
    | when\ (?:i|he|she|they|we)\ (?:was|were)\ (?:a\ |an\ )?(?:child|kid|teen|teenager|baby|toddler|little
    |young|younger|pregnant|\d+)
    | (?:can|could|may|might)\ (?:be\ (?:a\ )?(?:sign|symptom|caused)|indicate|signal|suggest|mean)
    | (?:is|are)\ (?:a\ )?(?:common\ |classic\ |typical\ |warning\ )?(?:signs?|symptoms?)
    | (?:happens|occurs)\ when | is\ caused\ by | is\ when | is\ a\ (?:condition|medical\ emergency)""")
# Scope ends: sentence punctuation, contrast words, a new clause or a new subject (NegEx terminators).
_BREAK_WORDS = r"""but|however|although|though|except|apart\ from|aside\ from|whereas|yet|now|then|suddenly
    |also|still|started|starting|began|presenting|presents|presented|complaining|complains|c/o|reports
    |reporting|admitted|with|i|i'm|im|i've|ive|i'd|my|me|he|he's|hes|she|she's|shes|his|her|they
    |they're|their|we|we're|our|you|your|it|it's|its|this|that|there|which|who"""
_PRE_BREAK = re.compile(r"[.;!?:\n()\[\]<>|*#\"]|\s-\s|(?<![\w'/])(?:" + _BREAK_WORDS + r")(?![\w'/])", re.VERBOSE)
_POST_BREAK = re.compile(r"[.;:!?\n()\[\]<>|*#\"]|\s-\s|(?<![\w'/])(?:and|or|but|however|although|though|except"
                         r"|yet|now|then|which|while|whereas|so)(?![\w'/])")
_LIST = re.compile(r"(?<![\w'])(?:or|nor)(?![\w'])")
_MAX_WORDS = {"negation": 6, "history": 4, "hypothetical": 12, "definition": 2}
_LIST_MAX_WORDS = 10
_POST_MAX_WORDS = 4


@dataclass(frozen=True)
class _Context:
    """Trigger spans of one normalised text, found once and reused for every candidate match."""

    text: str
    pre: tuple[tuple[int, int, str], ...]  # (start, end, kind), sorted by end
    post: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, text: str) -> "_Context":
        pseudo = [m.span() for m in _PSEUDO.finditer(text)]

        def free(m: re.Match[str]) -> bool:
            return not any(s < m.end() and m.start() < e for s, e in pseudo)

        kinds = (("negation", _NEGATION), ("history", _HISTORY), ("hypothetical", _HYPOTHETICAL),
                 ("definition", _DEFINITION))
        pre = sorted(((m.start(), m.end(), kind) for kind, rx in kinds for m in rx.finditer(text) if free(m)),
                     key=lambda t: t[1])
        return cls(text, tuple(pre), tuple(m.span() for m in _POST.finditer(text)))

    def affirmed(self, start: int, end: int) -> bool:
        return not (self._pre_scoped(start) or self._post_scoped(end))

    def _pre_scoped(self, start: int) -> bool:
        for t_start, t_end, kind in reversed(self.pre):
            if t_start >= start:
                continue  # a trigger that opens the match is part of it: "not breathing"
            gap = self.text[min(t_end, start):start]  # "worried about having a stroke" overlaps
            if _PRE_BREAK.search(gap):
                return False  # every earlier trigger is cut off by the same break
            if self._in_scope(gap, start, kind):
                return True
        return False

    def _in_scope(self, gap: str, start: int, kind: str) -> bool:
        # A comma ends a negation ("no fever, crushing chest pain") unless the clause is a list
        # joined by "or" ("denies chest pain, sweating or nausea"); hypothetical lists run on.
        limit = _MAX_WORDS[kind]
        if "," in gap and kind != "hypothetical":
            tail = self.text[start:]
            brk = _PRE_BREAK.search(tail)
            if not _LIST.search(gap + tail[: brk.start() if brk else len(tail)]):
                return False
            limit = _LIST_MAX_WORDS
        return len(gap.replace(",", " ").split()) <= limit

    def _post_scoped(self, end: int) -> bool:
        for t_start, _ in self.post:
            if t_start < end:
                continue
            gap = self.text[end:t_start].lstrip(" :-=")
            return not _POST_BREAK.search(gap) and len(gap.split()) <= _POST_MAX_WORDS
        return False


# --- rules: loading and validation ---------------------------------------------------------

def load_rules(path: str | Path | None = None) -> RedFlagRules:
    """Read and validate a rule file; every problem is reported with the rule it belongs to."""
    path = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RulesError(f"{path}: cannot read the red-flag rules: {error}") from error
    except json.JSONDecodeError as error:
        raise RulesError(f"{path}: the red-flag rules are not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise RulesError(f"{path}: expected an object with a non-empty 'rules' list")
    if unknown := set(data) - _TOP_KEYS:
        raise RulesError(f"{path}: unknown top-level keys {sorted(unknown)}")
    rules = tuple(_parse_rule(raw, f"{path}: rule #{index}") for index, raw in enumerate(data["rules"]))
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise RulesError(f"{path}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
    return RedFlagRules(rules=rules, path=str(path))


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: a rule must be a JSON object")
    if isinstance(raw.get("id"), str) and raw["id"]:
        where = f"{where} ({raw['id']!r})"
    if unknown := set(raw) - _RULE_KEYS:
        raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("id", "category", "urgency", "message", "source"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RulesError(f"{where}: '{key}' must be a non-empty string")
    if raw["urgency"] not in URGENCIES:
        raise RulesError(f"{where}: 'urgency' must be one of {URGENCIES}, not {raw['urgency']!r}")
    if not _URL.search(raw["source"]) or len(_URL.sub("", raw["source"]).strip(" —-:;")) < 3:
        raise RulesError(f"{where}: 'source' must name a guideline and give its https:// URL")
    if raw.get("unless_any") and raw["urgency"] == "emergency":
        raise RulesError(f"{where}: 'unless_any' is only allowed on urgent rules (it could hide an emergency)")
    groups = raw.get("requires_any", [])
    if not isinstance(groups, list) or not all(isinstance(group, list) for group in groups):
        raise RulesError(f"{where}: 'requires_any' must be a list of pattern lists")
    return Rule(
        id=raw["id"], category=raw["category"], urgency=raw["urgency"], message=raw["message"].strip(),
        source=raw["source"].strip(), patterns=_compile_all(raw["patterns"], f"{where} patterns"),
        requires_any=tuple(_compile_all(g, f"{where} requires_any[{i}]") for i, g in enumerate(groups)),
        unless_any=_compile_all(raw.get("unless_any", []), f"{where} unless_any", allow_empty=True),
    )


def _compile_all(patterns: object, where: str, allow_empty: bool = False) -> tuple[re.Pattern[str], ...]:
    if not isinstance(patterns, list) or (not patterns and not allow_empty):
        raise RulesError(f"{where}: must be a non-empty list of strings")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise RulesError(f"{where}: {pattern!r} is not a non-empty string")
        try:
            # Whole words only, so "stemi" never fires inside "systemic".
            rx = re.compile(r"(?<![a-z0-9])(?:" + pattern + r")(?![a-z0-9])", re.IGNORECASE)
        except re.error as error:
            raise RulesError(f"{where}: invalid regex {pattern!r}: {error}") from error
        if rx.search(""):
            raise RulesError(f"{where}: pattern {pattern!r} matches empty text")
        compiled.append(rx)
    return tuple(compiled)


@functools.lru_cache(maxsize=1)
def default_rules() -> RedFlagRules:
    """The shipped rules, read once per process (the file is immutable package data)."""
    return load_rules()


# --- matching ------------------------------------------------------------------------------

_TYPOGRAPHY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u201c": '"',
                             "\u201d": '"', "\u2013": " - ", "\u2014": " - ", "\u00a0": " "})


def _normalise(text: str) -> str:
    text = text.translate(_TYPOGRAPHY).lower()
    text = re.sub(r"[^\S\n]+", " ", text)
    return re.sub(r" ?\n\s*", "\n", text).strip()


def find_red_flags(text: str, rules: RedFlagRules | None = None) -> list[RedFlag]:
    """Red flags affirmed in `text`, emergencies first, then in rule-file order (deterministic)."""
    if not text or not text.strip():
        return []
    context = _Context.of(_normalise(text))
    return _merge([flag for rule in (rules or default_rules()).rules if (flag := _match_rule(rule, context))])


def _merge(flags: list[RedFlag]) -> list[RedFlag]:
    """One flag per rule, emergencies first; an urgent flag adds nothing beside an emergency of its kind."""
    first: dict[str, RedFlag] = {}
    for flag in flags:
        first.setdefault(flag.rule_id, flag)
    emergency = {flag.category for flag in first.values() if flag.urgency == "emergency"}
    kept = [flag for flag in first.values() if flag.urgency == "emergency" or flag.category not in emergency]
    return sorted(kept, key=lambda flag: URGENCIES.index(flag.urgency))  # stable: rule order within a level


def _match_rule(rule: Rule, context: _Context) -> RedFlag | None:
    for primary in _affirmed(rule.patterns, context):
        # Co-features must be found elsewhere: "chest tightness" alone is not "chest pain + tightness".
        extras = [next(_affirmed(group, context, avoid=primary.span()), None) for group in rule.requires_any]
        if None in extras:
            continue
        if next(_affirmed(rule.unless_any, context), None) is not None:
            return None
        matched = " + ".join(m.group().strip() for m in (primary, *extras))
        return RedFlag(rule.id, rule.category, rule.urgency, matched, rule.message, rule.source)
    return None


def _affirmed(patterns: tuple[re.Pattern[str], ...], context: _Context,
              avoid: tuple[int, int] | None = None) -> Iterator[re.Match[str]]:
    for rx in patterns:
        for m in rx.finditer(context.text):
            if avoid and m.start() < avoid[1] and avoid[0] < m.end():
                continue
            if context.affirmed(m.start(), m.end()):
                yield m


# --- messages and guarding the model's answer ------------------------------------------------

def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if s.strip()]


def escalation_message(flags: list[RedFlag]) -> str:
    """One banner: the most urgent level, each action once (emergency actions first), sources."""
    if not flags:
        return ""
    flags = sorted(flags, key=lambda flag: URGENCIES.index(flag.urgency))
    top = [f.category for f in flags if f.urgency == flags[0].urgency]
    lines = [_BANNER_HEAD[flags[0].urgency], "Possible: " + "; ".join(dict.fromkeys(top)) + "."]
    done: set[str] = set()
    for urgency in URGENCIES:
        actions = [s for f in flags if f.urgency == urgency for s in _sentences(f.message) if s not in done]
        if actions and urgency != flags[0].urgency:
            lines.append("Also get medical advice today about: "
                         + "; ".join(dict.fromkeys(f.category for f in flags if f.urgency == urgency)) + ".")
        lines += [f"- {action}" for action in dict.fromkeys(actions)]
        done.update(actions)
    sources = dict.fromkeys(part.strip() for flag in flags for part in flag.source.split("; "))
    return "\n".join([
        *lines,
        "",  # ends the action list, so Markdown renders what follows as its own lines
        "Recognised in the text: " + ", ".join(dict.fromkeys(f'"{flag.matched}"' for flag in flags)) + ".",
        "Sources: " + "; ".join(sources) + ".",
        _BANNER_FOOTER,
    ])


# Model sentences that would talk the reader out of acting on the banner.
_CONTRADICTION = re.compile(r"""
    \b(?:not|isn't|is\ not|isnt|no)\ (?:an?\ |really\ an?\ |likely\ an?\ |likely\ to\ be\ an?\ )?(?:emergency
        |urgent|serious|dangerous|life[- ]threatening|worrying|concerning|a\ concern|cause\ for\ concern|big\ deal)\b
    | \bno\ (?:need|reason)\ (?:to|for)\b | \bnot\ necessary\b
    | \b(?:don't|do\ not|dont|doesn't|does\ not|won't|will\ not)\ (?:need|have)\ to\b
    | \b(?:you|it|this|they|that)\ (?:can|could|may|should\ be\ able\ to)\ (?:safely\ |probably\ )?wait\b
    | (?<!not\ )(?<!n't\ )\bwait\ and\ see\b | \bsafe\ to\ wait\b
    | \bwait\ (?:until|till)\ (?:tomorrow|the\ morning|monday|next|your\ next)
    | (?<!not\ )(?<!n't\ )(?<!never\ )\b(?:stay|remain|rest)\ (?:at\ )?home\b
    | \bnothing\ (?:serious|to\ worry|to\ be\ (?:worried|concerned))\b | \bno\ cause\ for\ (?:alarm|concern)\b
    | \b(?:probably|likely|most\ likely|just)\ (?:just\ |only\ )?(?:nothing|indigestion|heartburn|anxiety
        |a\ panic\ attack|stress|muscular|a\ (?:pulled\ |strained\ )?muscle|a\ virus|a\ cold|gas|wind|a\ migraine
        |a\ tension\ headache)\b
    | \b(?:manage|treat|monitor|handle)\ (?:this|it|the\ symptoms|your\ symptoms)\ (?:at\ home|yourself)\b
    | \bself[- ]care\b | \bhome\ remed(?:y|ies)\b
    | \b(?:routine|regular|non-urgent)\ (?:appointment|check|visit|follow[- ]up)\b
    | \bnext\ (?:week|few\ days|month)\b | \bover[- ]?react\w*\b | \bdisregard\b
    | \bignore\ (?:the\ |this\ |that\ |any\ |above\ |previous\ |safety\ )*(?:warning|banner|alert|advice|message
        |notice|instructions?)\b
    """, re.IGNORECASE | re.VERBOSE)


def _drop_contradictions(text: str) -> str:
    kept_lines = []
    for line in text.splitlines():
        kept = [s for s in re.split(r"(?<=[.!?])\s+", line) if not _CONTRADICTION.search(s.translate(_TYPOGRAPHY))]
        if " ".join(kept).strip() or not line.strip():
            kept_lines.append(" ".join(kept))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept_lines)).strip()


def guard_answer(user_text: str, model_text: str, rules: RedFlagRules | None = None) -> str:
    """Put the escalation banner before the model's answer and drop sentences that contradict it.

    Flags come from the user's text and from the model's own text (e.g. an EHR summary that
    mentions crushing chest pain). A banner already in `model_text` is replaced, never duplicated.
    """
    body = _BANNER.sub("", model_text or "").strip()
    flags = _merge(find_red_flags(user_text or "", rules) + find_red_flags(body, rules))
    if not flags:
        return model_text
    body = _drop_contradictions(body)
    return escalation_message(flags) + ("\n\n" + body if body else "")


def label_draft(text: str) -> str:
    """Prefix DRAFT_LABEL exactly once, however often this is applied to the same text."""
    body = (text or "").replace(DRAFT_LABEL, "").strip()
    return f"{DRAFT_LABEL}\n\n{body}" if body else DRAFT_LABEL
