"""Cleaning BLIP captions and WD14/DeepDanbooru tags in a metadata file (finetune/clean_captions_and_tags.py).

Tags: the DeepDanbooru rating tail is dropped; `_` becomes a space (emoticon tags of 3 characters such as
`^_^` stay); with several people in the picture, tags that describe one person's hair, eyes or sleeves are
dropped (they cannot say whose); a tag is dropped when a longer tag contains it as whole words
(`shirt` beside `white shirt`); duplicates go. Captions: a fixed list of whole-word replacements that
turns caption-model phrasing ("an anime woman") into the words tags use ("a girl"), applied until
nothing changes.
"""

from __future__ import annotations

import re

RATING_TAG = re.compile(r"^rating[:_ ]")
SEVERAL_PEOPLE = re.compile(r"^(\d+|multiple) ?(girls|boys)$")
ONE_PERSON_FEATURE = re.compile(
    r"( hair| eyes| eye| sleeves| pupils| eyebrows| eyelashes)$|^(ponytail|twintails|braid|twin braids|hair bun|"
    r"bangs|ahoge|sidelocks|drill hair|bob cut|hime cut)$"
)

CAPTION_REPLACEMENTS = (
    ("an anime illustration of", "an illustration of"),
    ("an anime drawing of", "a drawing of"),
    ("an anime picture of", "a picture of"),
    ("a cartoon drawing of", "a drawing of"),
    ("a cartoon picture of", "a picture of"),
    ("a cartoon image of", "an image of"),
    ("anime character", "character"),
    ("cartoon character", "character"),
    ("anime girl", "girl"),
    ("anime girls", "girls"),
    ("anime boy", "boy"),
    ("anime boys", "boys"),
    ("cartoon girl", "girl"),
    ("cartoon boy", "boy"),
    ("young woman", "girl"),
    ("young women", "girls"),
    ("young man", "boy"),
    ("young men", "boys"),
    ("woman", "girl"),
    ("women", "girls"),
    ("lady", "girl"),
    ("ladies", "girls"),
    ("female", "girl"),
    ("girl girl", "girl"),
    ("boy boy", "boy"),
    ("an girl", "a girl"),
    ("an boy", "a boy"),
)


def _whole_words(phrase: str) -> re.Pattern:
    return re.compile(rf"(?<![\w]){re.escape(phrase)}(?![\w])")


_CAPTION_PATTERNS = tuple((_whole_words(old), new) for old, new in CAPTION_REPLACEMENTS)


def clean_caption(caption: str) -> str:
    """Apply the replacements (whole words) until the caption stops changing."""
    text = caption
    for _ in range(10):  # each pass can only shorten or re-word; a few passes always settle
        before = text
        for pattern, new in _CAPTION_PATTERNS:
            text = pattern.sub(new, text)
        text = re.sub(r"\s+", " ", text).strip()
        if text == before:
            break
    return text


def clean_tags(tags: str) -> str:
    """Clean a comma-separated tag string (see the module docstring); returns it joined by ", "."""
    items = [t.strip() for t in tags.split(",")]
    items = [t for t in items if t and not RATING_TAG.match(t)]
    items = [t.replace("_", " ") if len(t) > 3 else t for t in items]
    if any(SEVERAL_PEOPLE.match(t) for t in items):
        items = [t for t in items if not ONE_PERSON_FEATURE.search(t)]
    kept: list[str] = []
    for tag in items:
        if tag in kept:
            continue
        pattern = _whole_words(tag)
        if any(other != tag and pattern.search(other) for other in items):
            continue  # a longer tag says it, more precisely
        kept.append(tag)
    return ", ".join(kept)
