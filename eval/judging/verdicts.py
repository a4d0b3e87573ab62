"""Reading a judge's verdict out of its text: a 1–10 rating (`[[7]]`) or a pairwise choice (`[[A]]`).

Nothing is guessed. A text with no rating, with two different ratings, or with a rating outside 1–10 is a
failure with a reason, never a score. Half points (`[[7.5]]`) are accepted, as FastChat's parser does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

RATING_MIN, RATING_MAX = 1.0, 10.0

_NUMBER = r"([+-]?\d+(?:\.\d+)?)"
# [[7]], [[ 7 ]], [[7/10]]
_DOUBLE = re.compile(r"\[\[\s*" + _NUMBER + r"\s*(?:/\s*10\s*)?\]\]")
# "Rating: [7]" — single brackets only right after the word rating, so code such as a[5] is never read as a score
_SINGLE = re.compile(r"rating\W{0,3}\[\s*" + _NUMBER + r"\s*(?:/\s*10\s*)?\](?!\])", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")

# The regular expressions a constrained judge must produce (vLLM structured outputs).
RATING_REGEX = r"\[\[(10|[1-9])\]\]"
VERDICT_REGEX = r"\[\[(A|B|C)\]\]"
RATING_CHOICES = tuple(f"[[{i}]]" for i in range(1, 11))
VERDICT_CHOICES = ("[[A]]", "[[B]]", "[[C]]")


@dataclass(frozen=True)
class Extraction:
    """The verdict found in a judge's text, or why there is none."""

    value: Union[float, str, None]
    """The rating (float) or pairwise choice ('A', 'B', 'C'); None on failure."""
    reason: Union[str, None] = None
    """Failure reason: no_rating, ambiguous_rating, out_of_range, no_verdict, ambiguous_verdict."""
    detail: str = ""
    """What was found, for the failure record."""

    @property
    def ok(self) -> bool:
        return self.reason is None


def extract_rating(text: str) -> Extraction:
    """The single 1–10 rating in `text` written as [[x]] (or 'Rating: [x]' when no [[x]] appears)."""
    found = [float(m) for m in _DOUBLE.findall(text or "")]
    if not found:
        found = [float(m) for m in _SINGLE.findall(text or "")]
    if not found:
        return Extraction(None, "no_rating", "no [[rating]] marker in the judge output")
    distinct = sorted(set(found))
    if len(distinct) > 1:
        return Extraction(None, "ambiguous_rating", f"several different ratings: {_fmt(distinct)}")
    value = distinct[0]
    if not RATING_MIN <= value <= RATING_MAX:
        return Extraction(None, "out_of_range", f"rating {_fmt([value])} is outside 1-10")
    return Extraction(value)


def extract_verdict(text: str) -> Extraction:
    """The single pairwise verdict [[A]], [[B]] or [[C]] (tie) in `text`."""
    found = sorted(set(_VERDICT.findall(text or "")))
    if not found:
        return Extraction(None, "no_verdict", "no [[A]]/[[B]]/[[C]] marker in the judge output")
    if len(found) > 1:
        return Extraction(None, "ambiguous_verdict", f"several different verdicts: {', '.join(found)}")
    return Extraction(found[0])


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)
