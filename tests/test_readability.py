"""Reading levels: the grade bands and the note on how an education answer reads."""

from __future__ import annotations

from assistant.metrics import flesch_kincaid_grade
from assistant.readability import (LEVEL_GRADE_LIMITS, READING_LEVELS, plainest, reading_level_of, reading_note,
                                   reads_within)

SIMPLE = "Gout is a kind of pain. It hurts your toe. Ice can help."
GENERAL = "Gout is a type of arthritis that causes sudden pain and swelling in the joints, often the big toe."
DETAILED = ("Hyperuricemia predisposes individuals to monosodium urate crystallization within articular "
            "cartilage, precipitating recurrent inflammatory arthropathy.")


def test_reading_levels_follow_the_flesch_kincaid_grade_bands():
    grades = [flesch_kincaid_grade(text) for text in (SIMPLE, GENERAL, DETAILED)]
    assert grades[0] < LEVEL_GRADE_LIMITS[0] <= grades[1] < LEVEL_GRADE_LIMITS[1] <= grades[2]
    assert [reading_level_of(text) for text in (SIMPLE, GENERAL, DETAILED)] == list(READING_LEVELS)
    assert reading_level_of("") == READING_LEVELS[0]  # no words: no grade, the plainest level


def test_the_note_says_when_an_answer_reads_above_the_level_asked_for():
    simple, general, detailed = READING_LEVELS
    grade = f"{flesch_kincaid_grade(GENERAL):.1f}"
    assert reading_note(GENERAL, general) == f"Reading level: Flesch-Kincaid grade {grade}, within the general level asked for."
    assert reading_note(GENERAL, detailed).endswith("within the detailed level asked for.")  # plainer is fine
    harder = reading_note(GENERAL, simple)
    assert harder.startswith(f"Reading level: Flesch-Kincaid grade {grade}, harder than the simple level asked for")
    assert "(below grade 7)" in harder and "plainer words" in harder
    assert "harder than the general level" in reading_note(DETAILED, general)
    assert "within the simple level" in reading_note(SIMPLE, simple)


def test_no_words_no_note():
    assert reading_note("", READING_LEVELS[0]) == ""
    assert reading_note("  ... ", READING_LEVELS[0]) == ""



def test_reads_within_the_band_of_the_level_asked_for():
    assert reads_within(SIMPLE, READING_LEVELS[0]) and not reads_within(GENERAL, READING_LEVELS[0])
    assert reads_within(GENERAL, READING_LEVELS[1]) and not reads_within(DETAILED, READING_LEVELS[1])
    assert reads_within(DETAILED, READING_LEVELS[2])  # the detailed level has no upper grade
    assert reads_within("", READING_LEVELS[0])  # nothing to make plainer


def test_the_plainest_draft_is_the_lowest_grade_and_the_earliest_of_equals():
    assert plainest([DETAILED, GENERAL, SIMPLE, GENERAL]) is SIMPLE
    twin = "".join(SIMPLE)  # equal text, another object
    assert plainest([GENERAL, SIMPLE, twin]) is SIMPLE
    assert plainest(["", DETAILED]) == DETAILED  # a draft without words never wins over words
    assert plainest(["", ""]) == ""
