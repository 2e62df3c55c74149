"""``fam-hf compare``'s arms: the grammar, their settings and flags, refusals naming the grammar."""

from __future__ import annotations

import pytest

from fam_hf.commands import compare
from fam_hf.commands.compare import CompareError, parse_arm, parse_arms


def test_arms_parse_into_their_settings_and_flags():
    assert parse_arm("plain").flags() == ["--fam_lambda", "0.0", "--sam_rho", "0.0"]
    fam = parse_arm("fam")
    assert fam.fields == {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": "head", "sam_rho": 0.0}
    assert fam.flags() == ["--fam_share", "0.001", "--fam_gradient", "head", "--sam_rho", "0.0"]
    assert fam.unset == ["fam_lambda"]
    weights = parse_arm("fam:weights@0.02")
    assert weights.name == "fam:weights@0.02" and weights.slug == "fam_weights@0.02"
    assert weights.fields["fam_gradient"] == "weights" and weights.fields["fam_share"] == 0.02
    assert parse_arm("fam:full").fields["fam_share"] == 0.001 and parse_arm("fam:full").name == "fam:full@0.001"
    assert parse_arm("fam:@0.01").fields["fam_gradient"] == "head"
    assert parse_arm("fam:head@0.001").name == "fam"  # the defaults spelled out are the same arm
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
        ("fam:diagonal@0.1", "MODE must be one of full, head, weights"),
        ("fam:head@-1", "SHARE must be a number > 0"),
        ("fam:head@x", "SHARE must be a number > 0"),
        ("sam:0", "RHO must be a number > 0"),
        ("plain:1", "unknown arm"),
    ],
)
def test_unknown_arms_are_refused_with_the_grammar(arm, reason):
    with pytest.raises(CompareError, match="Arms are plain") as refused:
        parse_arm(arm)
    assert reason in str(refused.value)


def test_duplicate_arms_and_plain_alone_are_refused():
    with pytest.raises(CompareError, match="given twice"):
        parse_arms(["fam", "fam:head@0.001"])
    with pytest.raises(CompareError, match="nothing to compare"):
        parse_arms(["plain"])
