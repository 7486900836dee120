"""Hostile values for the fuzz tests of the console's and the CLI's doors.

Each is something a door must refuse with the field named, or take harmlessly:
text no store can keep (a NUL, lone surrogates), control characters, digits
that ``str.isdigit()`` takes but ``int()`` does not, numbers past Python's
4,300-digit ``int()`` limit or a bigint column, malformed page cursors, and
100 kB strings.
"""

from __future__ import annotations

from urllib.parse import quote_from_bytes

from hypothesis import strategies as st

_UUID = "01900000-0000-7000-8000-000000000000"

#: Values written out, so every run tries each of them (hypothesis draws from them first).
SAMPLES: tuple[str, ...] = (
    "\x00",
    "a\x00b",
    "\x01\x02\x1b[2J\x7f",
    "\r\n",
    "/sagas\r\nSet-Cookie: owned=1",
    "\ud800",
    "a\udcffb",
    "\udfff\ud800",
    "²",
    "٣",
    "\uff11",  # a fullwidth digit one
    "1²",
    "½",
    "1" * 5000,
    "-" + "9" * 5000,
    "-1",
    "-0",
    "0",
    "+5",
    " 7 ",
    str(2**31),
    str(2**63),
    str(2**64),
    "9" * 25,
    "1e309",
    "nan",
    "-inf",
    "1.5",
    "0x10",
    "1_000",
    "",
    " ",
    f"1_{_UUID}",
    f"{'9' * 16}_{_UUID}",
    "999999999999999_99999999999999999999",
    "1_",
    "_",
    "x" * 100_000,
    "é" * 100_000,
    "<script>alert(1)</script>",
    "' OR '1'='1",
    "../../etc/passwd",
    "//evil.example",
    "/\\evil.example",
    "//[::1",
    "%00",
    "\u202e\u2066",
    "\ufeff\uffff\U0010ffff",
)

#: One of each kind of trouble: each field of each route gets every one of these (the
#: explicit examples), beside the values hypothesis draws.
CORE: tuple[bytes, ...] = (
    b"\x00",  # PostgreSQL keeps no NUL in text
    b"\xed\xa0\x80",  # a lone surrogate, percent-encoded: not UTF-8
    "²".encode(),  # str.isdigit() says yes, int() says no
    b"1" * 5000,  # past int()'s 4,300 digits
    str(2**64).encode(),  # past a bigint column
    b"-1",
    b"999999999999999_99999999999999999999",  # a cursor's shape, out of range
    b"/audit\r\nSet-Cookie: owned=1",  # a header of its own, if it reached one
    b"x" * 100_000,
)

_ODD_CHARACTERS = st.characters(categories=("Cc", "Cs", "Cf", "Nd", "No", "Zs", "Lo"))

#: A hostile value, as text (lone surrogates included).
hostile_text = st.one_of(
    st.sampled_from(SAMPLES),
    st.text(_ODD_CHARACTERS, max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=30),
)

#: Octets that are not UTF-8 at all, as a URL or a form may carry them percent-encoded.
not_utf8 = st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"])


def octets(value: str) -> bytes:
    """``value`` as UTF-8, lone surrogates encoded as they are (so: invalid UTF-8)."""
    return value.encode("utf-8", "surrogatepass")


#: A hostile value as the octets a URL or a form body carries.
hostile_octets = st.one_of(hostile_text.map(octets), not_utf8)


def percent(raw: bytes) -> str:
    """``raw`` percent-encoded for a URL path segment, a query or a form body."""
    return quote_from_bytes(raw, safe="")
