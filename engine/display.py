"""Untrusted text made fit to show: control and bidirectional characters become escapes.

Business keys, errors, payloads, reasons and names come from outside. Shown as
they are, ``\\x1b[2J`` clears an operator's terminal, ``\\x1b]0;...\\x07``
retitles it, ``\\r`` overwrites what a line began with, and U+202E turns the
rest of a line around (``evil\\u202egpj.exe`` reads as ``evilexe.jpg``).
:func:`visible` turns each such character into a ``\\xNN`` or ``\\uNNNN``
escape, so that a person sees what is there; the console's pages and the
``saga`` command's output for people both use it. JSON documents need none of
it: JSON escapes control characters itself, and they stay exact.
"""

from __future__ import annotations

import unicodedata

#: Bidirectional-text controls: the marks (ALM, LRM, RLM), embeddings and overrides
#: (U+202A to U+202E) and isolates (U+2066 to U+2069). Each can reorder what is around it.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
#: Line and paragraph separators: line breaks to some readers, invisible to others.
SEPARATORS = frozenset("\u2028\u2029")
# Control characters (C0, DEL, C1), and lone surrogates, which no terminal can print.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs"})


def visible(text: str, *, keep: str = "") -> str:
    """``text`` with every control character (C0, DEL, C1), bidirectional control, line
    separator and lone surrogate as a ``\\xNN`` / ``\\uNNNN`` escape.

    The characters in ``keep`` stay as they are: the console keeps ``"\\t\\n"`` in
    the blocks it shows as preformatted text; one line of a terminal keeps none.
    Anything else (HTML, say) is left to the place that shows the text.
    """
    if text.isprintable():  # the usual case: nothing to escape
        return text
    return "".join(_visible_char(ch, keep) for ch in text)


def _visible_char(ch: str, keep: str) -> str:
    if ch in keep or not _hides_something(ch):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _hides_something(ch: str) -> bool:
    return (
        ch in BIDI_CONTROLS or ch in SEPARATORS or unicodedata.category(ch) in _ESCAPED_CATEGORIES
    )
