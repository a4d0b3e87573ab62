"""Rating and verdict extraction on adversarial judge outputs: a failure is a reason, never a score."""

import pytest

from eval.judging.verdicts import extract_rating, extract_verdict


@pytest.mark.parametrize("text, value", [
    ("The answer is accurate and well organised. Rating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("Score: [[ 10 ]]", 10.0),
    ("[[1]]", 1.0),
    ("Good. [[6/10]]", 6.0),
    ("I first thought [[6]], and I stand by it: [[6]]", 6.0),  # the same rating twice is one rating
    ("No double brackets, but Rating: [4]", 4.0),
    ("Explanation... the list a[5] has one element. Rating: [[3]]", 3.0),
])
def test_valid_ratings(text, value):
    got = extract_rating(text)
    assert got.ok and got.value == value


@pytest.mark.parametrize("text, reason", [
    ("", "no_rating"),
    ("A thoughtful answer; I would give it seven out of ten.", "no_rating"),
    ("Rating: 8/10", "no_rating"),
    ("rate on a scale: \"[[rating]]\"", "no_rating"),
    ("The element a[5] is wrong.", "no_rating"),  # single brackets count only after the word rating
    ("Rating: [[3]] ... on second thought [[9]]", "ambiguous_rating"),
    ('Format: "Rating: [[5]]". My verdict: [[8]]', "ambiguous_rating"),
    ("Rating: [[11]]", "out_of_range"),
    ("Rating: [[0]]", "out_of_range"),
    ("Rating: [[-2]]", "out_of_range"),
    ("Rating: [[100]]", "out_of_range"),
])
def test_failed_ratings(text, reason):
    got = extract_rating(text)
    assert not got.ok
    assert got.value is None
    assert got.reason == reason
    assert got.detail


@pytest.mark.parametrize("text, value, reason", [
    ("Assistant A is clearer. [[A]]", "A", None),
    ("[[ B ]]", "B", None),
    ("Both equal: [[C]]", "C", None),
    ("[[A]] or maybe [[B]]", None, "ambiguous_verdict"),
    ("Assistant A wins.", None, "no_verdict"),
    ("[[D]]", None, "no_verdict"),
])
def test_verdicts(text, value, reason):
    got = extract_verdict(text)
    assert got.value == value and got.reason == reason
