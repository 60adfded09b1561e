"""Reading levels of patient-education answers: the levels a patient can ask for, the
Flesch-Kincaid grade band of each, and the note that tells the clinician how an answer reads."""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import flesch_kincaid_grade

READING_LEVELS = ("simple (about age 10)", "general (about age 14)", "detailed (adult)")

# Flesch-Kincaid grade bands of the three reading levels (grade ~ age - 5: age 10 is grade 5, age
# 14 grade 9, an adult 13 and over; a band ends halfway to the next level). Training labels each
# target with the level whose band holds its grade (train_data_text), and the app tells the
# clinician when an answer reads above the level asked for.
LEVEL_GRADE_LIMITS = (7.0, 11.0)


def level_name(level: str) -> str:
    """A level's short name for a sentence: "simple" for "simple (about age 10)"."""
    return level.split(" (")[0]


def level_of_grade(grade: float) -> str:
    """The reading level (one of READING_LEVELS) whose grade band holds `grade`."""
    return READING_LEVELS[sum(grade >= limit for limit in LEVEL_GRADE_LIMITS)]


def reading_level_of(text: str) -> str:
    """The reading level whose grade band holds the text's FK grade (the simplest for no words)."""
    grade = flesch_kincaid_grade(text)
    return READING_LEVELS[0] if grade is None else level_of_grade(grade)


def reads_within(text: str, asked: str) -> bool:
    """Whether `text` reads at or below the level `asked` for (text without words does)."""
    grade = flesch_kincaid_grade(text)
    return grade is None or grade < _upper_limit(asked)


def plainest(drafts: Sequence[str]) -> str:
    """The draft with the lowest FK grade (the earliest of equals; drafts without words never win
    over one with words)."""
    graded = [(grade, index) for index, draft in enumerate(drafts)
              if (grade := flesch_kincaid_grade(draft)) is not None]
    return drafts[min(graded)[1]] if graded else drafts[0]


def _upper_limit(asked: str) -> float:
    """The grade at which text stops reading at the level `asked` (the detailed level has none)."""
    index = READING_LEVELS.index(asked)
    return LEVEL_GRADE_LIMITS[index] if index < len(LEVEL_GRADE_LIMITS) else float("inf")


def reading_note(answer: str, asked: str) -> str:
    """One line on how `answer` reads against the level `asked` for ('' for an answer without
    words). The 270M model often writes above the simple level (README, Training): a clinician
    who hands the answer on should know when it needs plainer words first."""
    grade = flesch_kincaid_grade(answer)
    if grade is None:
        return ""
    name, limit = level_name(asked), _upper_limit(asked)
    if grade < limit:
        return f"Reading level: Flesch-Kincaid grade {grade:.1f}, within the {name} level asked for."
    return (f"Reading level: Flesch-Kincaid grade {grade:.1f}, harder than the {name} level asked for "
            f"(below grade {limit:g}); put it in plainer words before giving it to a patient.")
