"""The draft-vs-image guard with written drafts and given probabilities (no model)."""

from __future__ import annotations

import json
import re

import pytest

from assistant.config import AssistantConfig, GuardConfig
from assistant.guard import NOTE_HEADER, check_draft, classifier_auroc, merge_probs
from assistant.safety import label_draft
from assistant.vision import FINDINGS, repo_root

LOW = dict.fromkeys(FINDINGS, 0.2)  # nothing stands out, nothing is unsupported


def probs(**overrides):
    return {**LOW, **overrides}


def test_a_stated_finding_the_image_does_not_support_is_flagged_as_uncertain():
    result = check_draft("FINDINGS: Small left pleural effusion. No pneumothorax.", probs(Effusion=0.08))
    (flag,) = result.flags
    assert (flag.kind, flag.finding, flag.nih_findings, flag.draft_status) == (
        "unsupported", "Pleural Effusion", ("Effusion",), 1)
    assert flag.probability == pytest.approx(0.08)
    assert "uncertain: the image evidence does not support 'pleural effusion' (p=0.08)" in result.note
    assert result.note.startswith(NOTE_HEADER) and "verify" in result.note


def test_supported_negated_and_hedged_statements_are_not_flagged():
    assert check_draft("Small left pleural effusion.", probs(Effusion=0.35)).flags == ()
    assert check_draft("No pleural effusion.", probs(Effusion=0.01)).flags == ()  # ruled out, low: fine
    assert check_draft("Possible pneumonia in the right base.", probs(Pneumonia=0.01)).flags == ()
    result = check_draft("The lungs are clear.", LOW)
    assert result.flags == () and result.note == ""


def test_a_likely_finding_the_draft_omits_or_rules_out_is_flagged():
    omitted = check_draft("The lungs are clear.", probs(Cardiomegaly=0.81))
    (flag,) = omitted.flags
    assert (flag.kind, flag.finding, flag.draft_status) == ("unmentioned", "Cardiomegaly", None)
    assert "suggests possible 'cardiomegaly' (p=0.81); the draft does not mention it" in flag.message
    (negated,) = check_draft("Heart size is normal.", probs(Cardiomegaly=0.81)).flags
    assert negated.draft_status == 0 and "the draft rules it out" in negated.message
    quiet = check_draft("The lungs are clear.", probs(Cardiomegaly=0.81),
                        GuardConfig(flag_unmentioned=False))
    assert quiet.flags == ()


def test_lung_lesion_uses_the_stronger_of_mass_and_nodule():
    draft = "8 mm nodule in the right upper lobe."
    assert check_draft(draft, probs(Mass=0.02, Nodule=0.30)).flags == ()
    (flag,) = check_draft(draft, probs(Mass=0.02, Nodule=0.05)).flags
    assert flag.finding == "Lung Lesion" and flag.nih_findings == ("Mass", "Nodule")
    assert flag.probability == pytest.approx(0.05)


def test_several_flags_and_unchecked_findings_are_listed():
    draft = label_draft("FINDINGS: Mild cardiomegaly. Right lower lobe consolidation. "
                        "Healed fracture of the left 5th rib.\nIMPRESSION: Pneumonia.")
    result = check_draft(draft, probs(Cardiomegaly=0.04, Consolidation=0.03, Pneumonia=0.5, Effusion=0.9))
    assert {(f.kind, f.finding) for f in result.flags} == {
        ("unsupported", "Cardiomegaly"), ("unsupported", "Consolidation"), ("unmentioned", "Pleural Effusion")}
    assert result.unchecked == ("Fracture",)
    assert "not checked against the image (no classifier output): fracture." in result.note
    assert len(result.note.splitlines()) == 1 + 3 + 1


def test_the_guard_never_calls_a_statement_wrong():
    drafts = ["Large right pneumothorax.", "Pulmonary edema.", "Bilateral effusions. No consolidation.",
              "The lungs are clear."]
    for draft in drafts:
        note = check_draft(draft, dict.fromkeys(FINDINGS, 0.0) | {"Atelectasis": 0.99}).note.lower()
        assert note and "uncertain" in note and "verify" in note
        assert not re.search(r"\b(wrong|incorrect|false|error|hallucinat)", note)


def test_unvalidated_findings_say_so():
    auroc = {"Effusion": 0.69, "Pneumothorax": None}
    (ptx,) = check_draft("Small apical pneumothorax.", probs(Pneumothorax=0.02), auroc=auroc).flags
    assert ptx.validated is False and "not validated for this finding" in ptx.message
    (eff,) = check_draft("Small effusion.", probs(Effusion=0.02), auroc=auroc).flags
    assert eff.validated is True and "not validated" not in eff.message
    (unknown,) = check_draft("Small effusion.", probs(Effusion=0.02)).flags
    assert unknown.validated is None


def test_shipped_classifier_metadata_gives_its_auroc():
    auroc = classifier_auroc(repo_root() / AssistantConfig().vision.weights)
    assert auroc["Effusion"] == pytest.approx(0.687, abs=0.01) and auroc["Pneumothorax"] is None
    assert classifier_auroc(repo_root() / "no-such-folder") == {}


def test_missing_findings_are_unchecked_and_bad_probabilities_refused():
    result = check_draft("Small effusion. Mild cardiomegaly.", {"Cardiomegaly": 0.01})
    assert [f.finding for f in result.flags] == ["Cardiomegaly"] and result.unchecked == ("Pleural Effusion",)
    for bad in ({"Effusion": 1.5}, {"Effusion": float("nan")}, {"Effusion": -0.1}):
        with pytest.raises(ValueError, match="between 0 and 1"):
            check_draft("Effusion.", bad)
    with pytest.raises(ValueError, match="must map"):
        check_draft("Effusion.", [0.1] * 14)


def test_merge_takes_the_largest_probability_over_a_studys_images():
    merged = merge_probs([probs(Effusion=0.05), probs(Effusion=0.4, Nodule=0.01)])
    assert merged["Effusion"] == 0.4 and merged["Nodule"] == 0.2
    assert merge_probs([]) == {}


def test_empty_drafts_and_config_round_trip():
    assert check_draft("", LOW).flags == () and check_draft("", probs(Edema=0.9)).flags[0].finding == "Edema"
    config = AssistantConfig().override({"guard.unsupported_below": 0.2})
    assert AssistantConfig.from_dict(json.loads(json.dumps(config.to_dict()))).guard.unsupported_below == 0.2
