"""Text observation/action spaces wide enough for the text LLM environments exchange."""

from __future__ import annotations

import functools
import unicodedata

from gymnasium.spaces import Text

# Blocks a math/chat model realistically reads or writes. Wider than gymnasium's alphanumeric
# default (which rejects spaces and punctuation) but finite, so sampling stays meaningful.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (0x0020, 0x007E),  # printable ASCII
    (0x00A0, 0x024F),  # Latin-1 supplement, Latin extended A/B
    (0x0300, 0x036F),  # combining diacritics (accents written as separate code points)
    (0x0370, 0x04FF),  # Greek, Cyrillic
    (0x2000, 0x214F),  # punctuation, super/subscripts, currency, letterlike symbols
    (0x2150, 0x23FF),  # number forms, arrows, mathematical operators, misc technical
    (0x25A0, 0x25FF),  # geometric shapes (squares, triangles used as QED marks)
    (0x27C0, 0x27FF),  # misc math symbols A, supplemental arrows A
    (0x2900, 0x2AFF),  # supplemental arrows B, misc math symbols B, supplemental operators
    (0x1D400, 0x1D7FF),  # mathematical alphanumeric symbols (bold/italic letters)
)


@functools.cache
def _base_charset() -> str:
    """All allowed characters as one sorted string; built once because Text() re-indexes it."""
    chars = {"\n", "\t", "\r"}
    for lo, hi in _BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            # Unassigned/private/surrogate code points never occur in real text.
            if unicodedata.category(ch) not in ("Cn", "Co", "Cs"):
                chars.add(ch)
    return "".join(sorted(chars))


class _TextSpace(Text):
    """A Text space whose repr does not print thousands of charset characters into logs."""

    def __repr__(self) -> str:
        return (
            f"Text({self.min_length}, {self.max_length}, charset=<{len(self.character_set)} chars>)"
        )


def text_space(max_length: int = 8192, extra_chars: str = "") -> Text:
    """A gymnasium Text space (0..max_length chars) over printable ASCII, newline/tab, Latin,
    Greek/Cyrillic and common unicode math symbols, plus any `extra_chars` (e.g. the characters
    of a loaded dataset, so its observations stay inside the space)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"text_space: max_length must be a positive int, got {max_length!r}")
    charset = _base_charset()
    if extra_chars:
        charset = "".join(sorted(set(charset).union(extra_chars)))
    # min_length=0: terminal observations are the empty string.
    return _TextSpace(max_length, min_length=0, charset=charset)
