"""Parse AUTOMATIC1111-style attention weights out of a caption.

Syntax (the subset that sd-scripts' ``--weighted_captions`` understands):

* ``(text)``        multiplies the weight of ``text`` by 1.1
* ``[text]``        divides it by 1.1
* ``(text:1.23)``   multiplies it by 1.23 (any signed decimal number)
* groups nest, and their factors multiply: ``((text))`` -> 1.21
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` stand for the literal character

Malformed input never raises; it degrades the way the web UI does:

* a group that is never closed still applies its factor to the rest of the text;
* a closing bracket without a matching opener is kept as literal text;
* ``:number)`` outside any round group is literal text, and so is a ``:`` that is
  not followed by a number and a ``)`` (``(a:b)`` is ``a:b`` at weight 1.1);
* a backslash that escapes nothing is a literal backslash.

``BREAK`` has no special meaning here.
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One alternative per kind of lexeme; every character of the input is matched by one of them.
_LEXEME = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])                                     # escaped bracket or backslash
    | (?P<open>[(\[])                                               # group openers
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)             # ':1.3)' closes a round group
    | (?P<close>[)\]])                                              # plain closers
    | (?P<text>[^\\()\[\]:]+|[\\:])                                 # ordinary text, lone '\' or ':'
    """,
    re.VERBOSE,
)


def _scale(segments: list[list], start: int, factor: float) -> None:
    """Multiply the weight of every segment from `start` to the end by `factor`."""
    for segment in segments[start:]:
        segment[1] *= factor


def _merge_equal_neighbours(segments: list[list]) -> list[tuple[str, float]]:
    """Join adjacent segments that carry the same weight; drop empty ones."""
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs, brackets removed.

    Adjacent fragments with equal weight are merged, so plain text gives
    ``[(text, 1.0)]`` and an empty string gives ``[]``.

    >>> parse_prompt_weights("a (red:1.5) circle")
    [('a ', 1.0), ('red', 1.5), (' circle', 1.0)]
    """
    segments: list[list] = []  # [fragment, weight] pairs, weights still being scaled
    round_starts: list[int] = []  # index in `segments` where each open '(' began
    square_starts: list[int] = []

    for match in _LEXEME.finditer(text):
        lexeme = match.group(0)
        if match.group("escaped") is not None:
            segments.append([match.group("escaped"), 1.0])
        elif match.group("open") is not None:
            (round_starts if lexeme == "(" else square_starts).append(len(segments))
        elif match.group("weight") is not None and round_starts:
            _scale(segments, round_starts.pop(), float(match.group("weight")))
        elif lexeme == ")" and round_starts:
            _scale(segments, round_starts.pop(), ROUND_FACTOR)
        elif lexeme == "]" and square_starts:
            _scale(segments, square_starts.pop(), SQUARE_FACTOR)
        else:  # ordinary text, or a closer with nothing to close
            segments.append([lexeme, 1.0])

    # Unclosed groups reach to the end of the text.
    for start in round_starts:
        _scale(segments, start, ROUND_FACTOR)
    for start in square_starts:
        _scale(segments, start, SQUARE_FACTOR)

    return _merge_equal_neighbours(segments)


def strip_prompt_weights(text: str) -> str:
    """The caption as the text encoder sees it: all weight syntax removed."""
    return "".join(fragment for fragment, _ in parse_prompt_weights(text))
