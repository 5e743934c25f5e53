"""Phone numbers to E.164, the one form in which a caller and a CRM record can be compared.

Pure: the ``phonenumbers`` library does the numbering plans; this module only removes what
people and devices put around a number (spaces, brackets, a trailing ``#``, German
call-by-call prefixes, a missing area code) and refuses what is not a number to match:
withheld callers, SIP URIs, service codes, extensions and garbage normalise to ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

#: What devices and carriers send for a caller who withholds the number.
WITHHELD = frozenset({
    "", "0", "anonymous", "unknown", "private", "restricted", "unavailable", "withheld",
    "unbekannt", "anonym", "clip_no_screening", "none", "null",
})

#: Fewer significant digits than this is an extension or a service code, never a client.
MIN_SIGNIFICANT_DIGITS = 6

#: A subscriber number dialled without its area code has at most this many digits (DE: 8,
#: US: 7); a longer string without a trunk prefix is a national number missing its 0.
_LOCAL_DIGITS = 8

_FORMATTING = re.compile(r"[\s\-./()\[\]\u00a0\u2010-\u2015]")
_DIALABLE = re.compile(r"^\+?[0-9]+$")
# Call-by-call carrier prefixes: 0100xx before 010xx (010 is no German area code).
_CALL_BY_CALL = {"DE": re.compile(r"^(0100[0-9]{2}|010(?!0)[0-9]{2})(?=0)")}


@dataclass(frozen=True)
class Dialling:
    """Where a number was seen: its country and, for a box, the local area code."""

    region: str = "GR"
    area_code: str = ""


def normalise(raw: str | None, where: Dialling = Dialling()) -> str | None:
    """The E.164 form of ``raw`` (``+302101234567``), or None when it is not a callable number."""
    if raw is None:
        return None
    text = raw.strip()
    if text.lower() in WITHHELD:
        return None
    if "@" in text or text.lower().startswith(("sip:", "tel:sip")) or text[0] in "*#":
        return None
    if text.lower().startswith("tel:"):
        text = text[4:]
    text = text.rstrip("#")
    text = _FORMATTING.sub("", text)
    if not _DIALABLE.match(text):
        return None
    if text.startswith("00"):
        text = "+" + text[2:]
    elif not text.startswith("+"):
        pattern = _CALL_BY_CALL.get(where.region)
        if pattern is not None:
            text = pattern.sub("", text, count=1)
    if text.startswith("+0") or text.strip("+0") == "":
        return None
    number = _parse(text, where)
    if number is None:
        return None
    significant = phonenumbers.national_significant_number(number)
    if len(significant) < MIN_SIGNIFICANT_DIGITS or not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _parse(text: str, where: Dialling) -> phonenumbers.PhoneNumber | None:
    if where.area_code and not text.startswith("+") and len(text) <= _LOCAL_DIGITS:
        local = _with_area_code(text, where)
        if local is not None:
            return local
    try:
        return phonenumbers.parse(text, where.region)
    except NumberParseException:
        return None


def _with_area_code(text: str, where: Dialling) -> phonenumbers.PhoneNumber | None:
    """``text`` as a local number dialled without its area code, if that makes a valid one."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(where.region)
    trunk = (metadata.national_prefix if metadata else None) or ""
    if trunk and text.startswith(trunk):
        return None  # already dialled with a trunk prefix, hence with its area code
    try:
        candidate = phonenumbers.parse(trunk + where.area_code + text, where.region)
    except NumberParseException:
        return None
    return candidate if phonenumbers.is_valid_number(candidate) else None


def is_withheld(raw: str | None) -> bool:
    """True for the forms a withheld caller arrives in (used to decide on tickets)."""
    return raw is None or raw.strip().lower() in WITHHELD or raw.strip().startswith("+0")
