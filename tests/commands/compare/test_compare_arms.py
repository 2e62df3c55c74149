"""``fam-hf compare``'s arms: the grammar, their settings and flags, refusals naming the grammar."""

from __future__ import annotations

import pytest

from fam_hf.commands import compare
from fam_hf.commands.compare import DEFAULT_MODE, CompareError, parse_arm, parse_arms


def test_arms_parse_into_their_settings_and_flags():
    assert parse_arm("plain").flags() == ["--fam_lambda", "0.0", "--sam_rho", "0.0"]
    fam = parse_arm("fam")
    assert fam.fields == {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": DEFAULT_MODE, "sam_rho": 0.0}
    assert fam.flags() == ["--fam_share", "0.001", "--fam_gradient", DEFAULT_MODE, "--sam_rho", "0.0"]
    assert fam.unset == ["fam_lambda"]
    weights = parse_arm("fam:weights@0.02")
    assert weights.name == "fam:weights@0.02" and weights.slug == "fam_weights@0.02"
    assert weights.fields["fam_gradient"] == "weights" and weights.fields["fam_share"] == 0.02
    assert parse_arm("fam:full").fields["fam_share"] == 0.001 and parse_arm("fam:full").name == "fam:full@0.001"
    assert parse_arm("fam:@0.01").fields["fam_gradient"] == DEFAULT_MODE == "auto"
    assert parse_arm("fam:auto@0.001").name == "fam"  # the defaults spelled out are the same arm
    assert parse_arm("fam:head@0.001").name == "fam:head@0.001"  # an explicit mode is another arm
    assert parse_arm("sam").fields == {"fam_lambda": 0.0, "sam_rho": 0.05}
    assert parse_arm("sam:0.1").fields["sam_rho"] == 0.1 and parse_arm("sam:0.05").name == "sam"
    assert [a.name for a in parse_arms(["sam", "fam"])] == ["plain", "sam", "fam"]  # plain first, added


def test_the_gradient_modes_are_the_librarys():
    from fam_hf.flatness import GRADIENT_MODES

    assert tuple(compare.GRADIENT_MODES) == tuple(GRADIENT_MODES)


@pytest.mark.parametrize(
    ("arm", "reason"),
    [
        ("fsam", "unknown arm 'fsam'"),
        ("python", "put the training command after `--`"),
        ("fam:diagonal@0.1", "MODE must be one of auto, full, head, weights"),
        ("fam:head@-1", "SHARE must be a number > 0"),
        ("fam:head@x", "SHARE must be a number > 0"),
        ("sam:0", "RHO must be a number > 0"),
        ("plain:1", "unknown arm"),
        # controls (+FIELD=VALUE)
        ("plain+learning_rate", "is not FIELD=VALUE"),
        ("plain+=3", "is not FIELD=VALUE"),
        ("plain+learning-rate=3", "is not FIELD=VALUE"),
        ("plain+learning_rate=", "is not FIELD=VALUE"),
        ("plain+fam_lambda=0.1", "fam_lambda is set by the arm itself"),
        ("fam+fam_share=0.1", "fam_share is set by the arm itself"),
        ("plain+seed=3", "seed is set by the arm itself or by compare"),
        ("plain+learning_rate=1+learning_rate=2", "sets a field twice"),
        ("fsam+learning_rate=1", "unknown arm 'fsam+learning_rate=1'"),
    ],
)
def test_unknown_arms_are_refused_with_the_grammar(arm, reason):
    with pytest.raises(CompareError, match="Arms are plain") as refused:
        parse_arm(arm)
    assert reason in str(refused.value)


def test_duplicate_arms_and_plain_alone_are_refused():
    with pytest.raises(CompareError, match="given twice"):
        parse_arms(["fam", "fam:auto@0.001"])
    with pytest.raises(CompareError, match="nothing to compare"):
        parse_arms(["plain"])


def test_controls_add_settings_of_the_training_command_to_an_arm():
    lr = parse_arm("plain+learning_rate=2e-3")
    assert lr.name == "plain+learning_rate=2e-3" and lr.slug == "plain+learning_rate_2e-3"
    assert lr.flags() == ["--fam_lambda", "0.0", "--sam_rho", "0.0", "--learning_rate", "2e-3"]  # the value verbatim
    assert lr.removed == ["fam_share"]  # still the plain arm underneath
    head = parse_arm("fam:head@0.1+lora_on_head=true+label_smoothing_factor=0.1")
    assert head.fields["fam_share"] == 0.1 and head.unset == ["fam_lambda"]
    assert head.flags()[-4:] == ["--lora_on_head", "true", "--label_smoothing_factor", "0.1"]
    # a control is its own arm beside plain, which stays the baseline
    assert [a.name for a in parse_arms(["plain+learning_rate=2e-3"])] == ["plain", "plain+learning_rate=2e-3"]
