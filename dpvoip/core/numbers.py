"""Phone numbers to E.164, the one form in which a caller and a CRM record can be compared.

Pure: the ``phonenumbers`` library does the numbering plans; this module only removes what
people and devices put around a number (spaces, brackets, a trailing ``#``, German
call-by-call prefixes, a missing area code) and refuses what is not a number to match:
withheld callers, SIP URIs, service codes, extensions and garbage normalise to ``None``.
"""

from __future__ import annotations

import functools
import re
import unicodedata
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
#: The longest text read as a number: the CRM's widest phone column. Longer input is not a
#: number, and parsing it costs time that grows with its length.
MAX_RAW_CHARS = 100

#: A subscriber number dialled without its area code has at most this many digits (DE: 8,
#: US: 7); a longer string without a trunk prefix is a national number missing its 0.
_LOCAL_DIGITS = 8

#: E.164 allows at most 15 digits, country code included.
_E164_DIGITS = 15
# An extension after the number ("ext. 12", "x123", ";ext=12"): the call comes from the
# main number, so that is what is matched.
_EXTENSION = re.compile(r"(?i)\s*(?:;\s*ext=|ext\.?|extension|x)\s*[0-9]{1,6}\s*$")
# "+49 (0)30 ...": the trunk 0 written in brackets after the country code.
_BRACKETED_TRUNK = re.compile(r"^(\+|00)([1-9][0-9]{0,2})[\s.-]*\(0\)")
_FORMATTING = re.compile(r"[\s\-./()\[\]\u00a0\u2010-\u2015]")
_DIALABLE = re.compile(r"^\+?[0-9]+$")
# Call-by-call carrier prefixes: 0100xx before 010xx (010 is no German area code).
_CALL_BY_CALL = {"DE": re.compile(r"^(0100[0-9]{2}|010(?!0)[0-9]{2})(?=0)")}


@dataclass(frozen=True)
class Dialling:
    """Where a number was seen: its country and, for a box, the local area code."""

    region: str = "GR"
    area_code: str = ""


#: Numbers normalised lately, remembered: a caller's number is normalised by each event of
#: a call, and the parse is the dearest step of a webhook (issue 21). A few hundred KB at
#: most. (A lookup parses a CRM column only when its text changed since it was indexed.)
NORMALISED_CACHE = 4096


def normalise(raw: str | None, where: Dialling = Dialling()) -> str | None:
    """The E.164 form of ``raw`` (``+302101234567``), or None when it is not a callable number."""
    if raw is None or len(raw) > MAX_RAW_CHARS:
        return None
    return _remembered(raw, where)


def normalise_once(raw: str | None, where: Dialling = Dialling()) -> str | None:
    """``normalise``, not remembered: for texts parsed once in a long while (the directory's
    build and refresh), which would push the callers' numbers out of the remembered
    parses, and leave their entries scattered over memory the build used for a moment."""
    if raw is None or len(raw) > MAX_RAW_CHARS:
        return None
    return _parse_text(raw, where)


def _parse_text(raw: str, where: Dialling) -> str | None:
    # Invisible format characters (direction marks, zero-width spaces, BOM, soft hyphen)
    # come with numbers copied from messengers and spreadsheets.
    text = "".join(ch for ch in raw if unicodedata.category(ch) != "Cf").strip()
    if text.lower() in WITHHELD:
        return None
    if "@" in text or text.lower().startswith(("sip:", "tel:sip")) or text[0] in "*#":
        return None
    if text.lower().startswith("tel:"):
        text = text[4:]
    text = text.rstrip("#")
    text = _EXTENSION.sub("", text)
    text = _BRACKETED_TRUNK.sub(r"\1\2", text)
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
    number = _without_doubled_trunk(number)
    significant = phonenumbers.national_significant_number(number)
    if len(significant) < MIN_SIGNIFICANT_DIGITS:
        return None
    if len(str(number.country_code)) + len(significant) > _E164_DIGITS:
        return None
    # A plausible national length is enough (full validation is slow, and new ranges appear
    # before the metadata knows them), but not a local-only length (7 digits in the US exist
    # in every area code), nor a trunk 0 kept after the country code (unless the plan says
    # the number is valid so: Italy's leading zero is part of its numbers).
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    if significant.startswith("0") and not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


_remembered = functools.lru_cache(maxsize=NORMALISED_CACHE)(_parse_text)


def _without_doubled_trunk(number: phonenumbers.PhoneNumber) -> phonenumbers.PhoneNumber:
    """``+49 030 ...`` (a trunk 0 written after the country code) is ``+49 30 ...``."""
    significant = phonenumbers.national_significant_number(number)
    if not significant.startswith("0") or phonenumbers.is_valid_number(number):
        return number
    try:
        fixed = phonenumbers.parse(f"+{number.country_code}{significant.lstrip('0')}")
    except NumberParseException:
        return number
    return fixed if phonenumbers.is_valid_number(fixed) else number


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


def without_formatting(text: str) -> str:
    """``text`` without what people put between the digits of a number (spaces, dots,
    dashes, brackets), for a number that is sent on as written, not normalised."""
    return _FORMATTING.sub("", text)


def is_withheld(raw: str | None) -> bool:
    """True for the forms a withheld caller arrives in (used to decide on tickets).

    Includes SIP's own form for an anonymous caller, ``sip:anonymous@anonymous.invalid``
    (RFC 3323).
    """
    if raw is None:
        return True
    text = raw.strip().lower()
    if text.startswith("sip:"):
        text = text[4:]
    return text in WITHHELD or text.startswith("+0") or text.startswith("anonymous@")
