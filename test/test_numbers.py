"""Phone numbers as people type them into the CRM and as a Fritz!Box or Zadarma sends them:
every realistic spelling of one number gives the same E.164, everything that must never be
matched (withheld, short, service codes, SIP URIs, garbage) gives None, and for arbitrary
text ``normalise`` never raises, only returns E.164 and is idempotent."""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpvoip.core.numbers import NORMALISED_CACHE, WITHHELD, Dialling, is_withheld, normalise

#: Where each country's office or box is: its region and one real local area code.
AREA_CODES = {"GR": "210", "DE": "30", "AT": "1", "CH": "44", "GB": "20", "US": "415"}
REGIONS = tuple(AREA_CODES)
#: Every place a number can be seen: the CRM (region only) and a box (region + area code).
PLACES = tuple(
    place
    for region, area in AREA_CODES.items()
    for place in (Dialling(region), Dialling(region, area))
)

E164 = re.compile(r"\+[1-9][0-9]{5,14}")


def _where_id(where: Dialling) -> str:
    return f"{where.region}/{where.area_code}" if where.area_code else where.region


Case = tuple[str, Dialling, str]


def _table(expected: str, spellings: tuple[str, ...], *places: Dialling) -> list[Case]:
    """One case per (spelling, place): each must normalise to ``expected``."""
    return [(raw, where, expected) for where in places for raw in spellings]


def _case_id(case: Case) -> str:
    raw, where, expected = case
    return f"{_where_id(where)}:{raw!r}->{expected}"


GR = Dialling("GR")
DE, DE_BERLIN = Dialling("DE"), Dialling("DE", "30")
AT, AT_VIENNA = Dialling("AT"), Dialling("AT", "1")
CH, CH_ZURICH = Dialling("CH"), Dialling("CH", "44")
GB, GB_LONDON = Dialling("GB"), Dialling("GB", "20")
US, US_SF = Dialling("US"), Dialling("US", "415")

# ---------------------------------------------------------------------------------------------
# The same number, every way it is written
# ---------------------------------------------------------------------------------------------

SAME_NUMBER: list[Case] = [
    # Greece, Athens landline (210 xxx xxxx): closed 10-digit plan, no trunk prefix.
    *_table(
        "+302101234567",
        (
            "210 123 4567", "2101234567", "210-123-4567", "210.123.4567", "(210) 1234567",
            "210 12 34 567", "+30 210 1234567", "+302101234567", "+30-210-123-4567",
            "+30 (210) 123 4567", "+30 210-123 4567", "(+30) 210 1234567", "0030 210 1234567",
            "00302101234567", "(0030) 210 1234567", "0030.210.123.4567", "+ 30 210 1234567",
            "+30 210 1234567#",
        ),
        GR, Dialling("GR", "210"),
    ),
    # Greece, Thessaloniki (4-digit area code 2310).
    *_table(
        "+302310123456",
        ("2310 123456", "2310-123-456", "+30 2310 123 456", "0030 2310123456"),
        GR,
    ),
    # Greece, mobiles 69x xxx xxxx.
    *_table(
        "+306941234567",
        (
            "694 123 4567", "6941234567", "694-123-4567", "694.123.4567", "694.123.45.67",
            "69 4123 4567", "+30 694 123 4567", "+306941234567", "0030 694 1234567",
            "0030 6941234567", "(+30) 6941234567",
        ),
        GR, Dialling("GR", "210"),
    ),
    *_table("+306971234567", ("697 123 4567", "+30 697 1234567"), GR),
    # Foreign numbers written into the Greek CRM.
    *_table(
        "+49301234567",
        ("+49 30 1234567", "0049 30 1234567", "+49 (0)30 1234567", "0049 (0)30 1234567"),
        GR,
    ),
    *_table("+442079460958", ("+44 20 7946 0958", "0044 (0)20 7946 0958"), GR),
    *_table("+14155552671", ("+1 (415) 555-2671", "001 415 555 2671"), GR),
    *_table("+41446681800", ("+41 44 668 18 00",), GR),
    *_table("+436641234567", ("+43 664 1234567",), GR),
    # Germany, Berlin landline: DIN 5008, old bracket style, "(0)", Fritz!Box's trailing "#",
    # call-by-call prefixes 010xx / 0100xx before the national number.
    *_table(
        "+49301234567",
        (
            "030/1234567", "030 1234567", "030-1234567", "030-123 45 67", "(030) 123 45 67",
            "(0 30) 12 34 56 7", "0301234567", "030 12345-67", "+49 30 1234567",
            "+49-30-1234567", "+49 (0)30 1234567", "+49 (0) 30 123 45 67", "0049 30 1234567",
            "00 49 30 1234567", "0049 (0)30 1234567", "030 1234567#", "0301234567#",
            "030 1234567 #", "01013 030 1234567", "010130301234567", "01088 030 1234567",
            "010012 030 1234567", "0100120301234567", "0100 88 030 1234567",
        ),
        DE, DE_BERLIN,
    ),
    # Germany, a local Berlin number dialled without its area code, seen by a box in Berlin.
    *_table(
        "+49301234567", ("1234567", "123 45 67", "123-4567", "1234567#"), DE_BERLIN
    ),
    # Germany, mobile 0171.
    *_table(
        "+491711234567",
        (
            "0171-1234567", "0171 1234567", "0171/123 45 67", "01711234567", "0171 1234567#",
            "+49 171 1234567", "+49 (0)171 1234567", "0049 171 1234567", "0049171 1234567",
            "01013 0171 1234567", "0100 12 0171 1234567",
        ),
        DE, DE_BERLIN,
    ),
    # Germany, local numbers of 8 digits (the limit) and of 5 digits in a small town.
    *_table("+493012345678", ("12345678", "1234 5678"), DE_BERLIN),
    *_table("+498912345678", ("12345678",), Dialling("DE", "89")),
    *_table("+49334112345", ("12345",), Dialling("DE", "3341")),
    # Germany, a "-0" after the number is the switchboard: a different, valid number.
    *_table("+493012345670", ("+49 30 1234567-0", "030 1234567-0"), DE, DE_BERLIN),
    # Austria, Vienna (area code 1) and mobile 0664.
    *_table(
        "+4315123456",
        (
            "01 5123456", "01/5123456", "01 512 34 56", "(01) 512 34 56", "+43 1 5123456",
            "+43 (0)1 5123456", "+43-1-512 34 56", "0043 1 5123456",
        ),
        AT, AT_VIENNA,
    ),
    *_table("+4315123456", ("5123456", "512 34 56"), AT_VIENNA),
    *_table(
        "+436641234567",
        (
            "0664 1234567", "0664/1234567", "0664 123 45 67", "06641234567", "+43 664 1234567",
            "+43 (0)664 1234567", "0043 664 1234567", "0043664 1234567",
        ),
        AT, AT_VIENNA,
    ),
    # Switzerland, Zurich (044) and mobile 079.
    *_table(
        "+41446681800",
        (
            "044 668 18 00", "044/668 18 00", "044 668 1800", "0446681800",
            "+41 44 668 18 00", "+41 (0)44 668 18 00", "0041 44 668 18 00",
        ),
        CH, CH_ZURICH,
    ),
    *_table("+41446681800", ("668 18 00", "6681800"), CH_ZURICH),
    *_table(
        "+41791234567",
        (
            "079 123 45 67", "079/123 45 67", "0791234567", "+41 79 123 45 67",
            "+41 (0)79 123 45 67", "0041 79 123 45 67", "0041791234567",
        ),
        CH, CH_ZURICH,
    ),
    # United Kingdom, London (020) and mobile 07911.
    *_table(
        "+442079460958",
        (
            "020 7946 0958", "(020) 7946 0958", "020-7946-0958", "02079460958",
            "+44 20 7946 0958", "+44 (0)20 7946 0958", "+44 (0) 20 7946 0958",
            "0044 20 7946 0958",
        ),
        GB, GB_LONDON,
    ),
    *_table("+442079460958", ("7946 0958", "79460958"), GB_LONDON),
    *_table(
        "+447911123456",
        (
            "07911 123456", "07911 123 456", "07911-123456", "07911-123-456",
            "+44 7911 123456", "+44 (0)7911 123456", "0044 7911 123456",
        ),
        GB, GB_LONDON,
    ),
    # United States, San Francisco: NANP formats, "1" trunk prefix, local 7 digits with the
    # box's area code, and the US international prefix 011.
    *_table(
        "+14155552671",
        (
            "(415) 555-2671", "(415)555-2671", "415-555-2671", "415.555.2671", "415 555 2671",
            "4155552671", "1-415-555-2671", "1 (415) 555-2671", "+1 415 555 2671",
            "+1 (415) 555-2671", "+1-415-555-2671", "+14155552671",
        ),
        US, US_SF,
    ),
    *_table("+14155552671", ("555-2671", "5552671", "555 2671"), US_SF),
    *_table("+442079460958", ("011 44 20 7946 0958",), US, US_SF),
    *_table("+302101234567", ("011 30 210 123 4567",), US, US_SF),
    *_table("+49301234567", ("011 49 30 1234567",), US, US_SF),
]


@pytest.mark.parametrize(
    ("raw", "where", "expected"), SAME_NUMBER, ids=[_case_id(case) for case in SAME_NUMBER]
)
def test_every_spelling_gives_the_same_e164(raw: str, where: Dialling, expected: str) -> None:
    assert normalise(raw, where) == expected


EXPECTED_NUMBERS = sorted({expected for _, _, expected in SAME_NUMBER})


@pytest.mark.parametrize("number", EXPECTED_NUMBERS)
def test_expected_numbers_are_real_and_valid(number: str) -> None:
    """Guards the tables above: every expectation is a valid number of a real range."""
    assert phonenumbers.is_valid_number(phonenumbers.parse(number))


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@pytest.mark.parametrize("number", EXPECTED_NUMBERS)
def test_e164_is_the_same_everywhere(number: str, where: Dialling) -> None:
    """An E.164 caller id (Zadarma) matches whatever the configured region and area code."""
    assert normalise(number, where) == number


def test_default_region_is_greece() -> None:
    assert Dialling() == Dialling("GR", "")
    assert normalise("210 123 4567") == "+302101234567"
    assert normalise("694 123 4567") == "+306941234567"


# ---------------------------------------------------------------------------------------------
# Local numbers, national numbers without their trunk 0, call-by-call only in Germany
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "where", "expected"),
    [
        # More than 8 digits without trunk prefix: a national number missing its 0, never a
        # local number (+49 30 891234567 is valid too, and would be wrong here).
        pytest.param("891234567", DE_BERLIN, "+49891234567", id="DE/30:9-digits-Munich"),
        pytest.param("89 1234567", DE_BERLIN, "+49891234567", id="DE/30:9-digits-spaced"),
        pytest.param("301234567", DE_BERLIN, "+49301234567", id="DE/30:Berlin-without-0"),
        pytest.param("301234567", DE, "+49301234567", id="DE:Berlin-without-0"),
        pytest.param("1711234567", DE_BERLIN, "+491711234567", id="DE/30:mobile-without-0"),
        pytest.param("6641234567", AT_VIENNA, "+436641234567", id="AT/1:mobile-without-0"),
        pytest.param("446681800", CH_ZURICH, "+41446681800", id="CH/44:without-0"),
        pytest.param("2079460958", GB_LONDON, "+442079460958", id="GB/20:without-0"),
        pytest.param("4155552671", US_SF, "+14155552671", id="US/415:10-digits"),
        # A number with the trunk prefix already has its area code: the box's is not added.
        pytest.param("0891234567", DE_BERLIN, "+49891234567", id="DE/30:with-trunk-0"),
        pytest.param("0664 1234567", AT_VIENNA, "+436641234567", id="AT/1:with-trunk-0"),
        # Greece has no trunk prefix: the area code is simply put in front.
        pytest.param("123456", Dialling("GR", "2310"), "+302310123456", id="GR/2310:local"),
        pytest.param("1234567", Dialling("GR", "210"), "+302101234567", id="GR/210:local"),
    ],
)
def test_local_and_national_numbers(raw: str, where: Dialling, expected: str) -> None:
    assert normalise(raw, where) == expected


def test_nine_digits_are_not_local() -> None:
    assert normalise("891234567", DE_BERLIN) != "+4930891234567"
    assert normalise("123456789", DE_BERLIN) == normalise("0123456789", DE_BERLIN)


@pytest.mark.parametrize(
    ("raw", "where", "stripped"),
    [
        pytest.param("01013 01 5123456", AT_VIENNA, "+4315123456", id="AT"),
        pytest.param("01013 044 668 18 00", CH_ZURICH, "+41446681800", id="CH"),
        pytest.param("01013 020 7946 0958", GB_LONDON, "+442079460958", id="GB"),
        pytest.param("01013 030 1234567", GR, "+49301234567", id="GR"),
    ],
)
def test_call_by_call_prefixes_are_german_only(raw: str, where: Dialling, stripped: str) -> None:
    assert normalise(raw, where) != stripped


# ---------------------------------------------------------------------------------------------
# Never a match
# ---------------------------------------------------------------------------------------------

WITHHELD_SPELLINGS = (
    "", " ", "\t", "0", " 0 ", "+0", "+000", "+0 30 1234567", "+0049301234567",
    "anonymous", "Anonymous", "ANONYMOUS", "unknown", "Unknown", "UNKNOWN", " unknown ",
    "private", "Private", "restricted", "unavailable", "withheld", "Withheld", "unbekannt",
    "Unbekannt", "anonym", "clip_no_screening", "none", "null",
)

NEVER_ANYWHERE = (
    *WITHHELD_SPELLINGS,
    "00", "000", "0000000", "+",
    # Internal extensions and emergency / short numbers (with or without the area code).
    "**610", "**1", "**9", "11", "110", "112", "911",
    # Service codes: "*" or "#" first.
    "*31#", "#31#", "#96*5*", "*21*0301234567#", "*#06#", "#", "*",
    # SIP URIs and bare SIP addresses, even with an E.164 user part.
    "sip:100@pbx.local", "SIP:100@pbx.local", "sip:100", "sips:100@pbx.local",
    "100@10.0.0.1", "sip:+302101234567@sip.zadarma.com", "tel:sip:100@pbx.local",
    # Garbage.
    "abc", "12ab34", "--", "()", "-", ".", "n/a", "tbd", "tel:", "+30 21O 1234567",
    "+30 210 1234567 1234567", "2101234567890123456",
    # Possible-length check: one digit short of a Greek number.
    "+30210123456",
)

#: Fewer than 6 significant digits is never a client (only where no area code completes it).
SHORT = ("12345", "1234", "123", "1", "+30 12345", "+49 30 123", "+43 1 2345")


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@pytest.mark.parametrize("raw", NEVER_ANYWHERE)
def test_never_a_match(raw: str, where: Dialling) -> None:
    assert normalise(raw, where) is None


@pytest.mark.parametrize("where", [Dialling(region) for region in REGIONS], ids=_where_id)
@pytest.mark.parametrize("raw", SHORT)
def test_short_numbers_are_never_a_match(raw: str, where: Dialling) -> None:
    assert normalise(raw, where) is None


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
def test_none_is_never_a_match(where: Dialling) -> None:
    assert normalise(None, where) is None


# ---------------------------------------------------------------------------------------------
# is_withheld
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [None, *WITHHELD_SPELLINGS, *sorted(WITHHELD)])
def test_withheld(raw: str | None) -> None:
    assert is_withheld(raw)
    assert normalise(raw) is None


@pytest.mark.parametrize(
    "raw",
    ["+302101234567", "210 123 4567", "0049 30 1234567", "**610", "*31#", "sip:100@pbx.local",
     "anonymously", "unknown caller 2101234567"],
)
def test_not_withheld(raw: str) -> None:
    assert not is_withheld(raw)


@pytest.mark.parametrize(
    "raw", ["sip:anonymous@anonymous.invalid", "anonymous@anonymous.invalid"]
)
def test_anonymous_sip_uri_is_withheld(raw: str) -> None:
    assert is_withheld(raw)


# ---------------------------------------------------------------------------------------------
# What a serious product must also handle (copy-paste, URIs, extensions)
# ---------------------------------------------------------------------------------------------

#: What people also write, and what it must give (None: never a match), one reason a group.
ALSO_WRITTEN = [
    # Leading/trailing whitespace from forms and CSV imports, incl. CR LF.
    pytest.param("  +30 210 1234567  ", GR, "+302101234567", id="spaces-around"),
    pytest.param("\t210 1234567\n", GR, "+302101234567", id="tab-newline"),
    pytest.param("210 123 4567\r\n", GR, "+302101234567", id="crlf"),
    # Spaces and dashes that copy-paste from web pages and Word produce.
    pytest.param("210\u00a0123\u00a04567", GR, "+302101234567", id="nbsp"),
    pytest.param("+30\u202f210\u202f1234567", GR, "+302101234567", id="narrow-nbsp"),
    pytest.param("+30\u2009210\u20091234567", GR, "+302101234567", id="thin-space"),
    pytest.param("+30\u3000210 1234567", GR, "+302101234567", id="ideographic-space"),
    pytest.param("210\u2013123\u20134567", GR, "+302101234567", id="en-dash"),
    pytest.param("030\u20141234567", DE, "+49301234567", id="em-dash"),
    pytest.param("210\u2011123\u20114567", GR, "+302101234567", id="nb-hyphen"),
    pytest.param("210\u20121234567", GR, "+302101234567", id="figure-dash"),
    # RFC 3966 tel: URIs (click-to-call links copied into the CRM).
    pytest.param("tel:+302101234567", GR, "+302101234567", id="tel-uri"),
    pytest.param("TEL:+30-210-123-4567", GR, "+302101234567", id="tel-uri-upper"),
    pytest.param("tel:+49-30-1234567", GR, "+49301234567", id="tel-uri-foreign"),
    # Invisible format characters: the user sees and means the number.
    pytest.param("\u200e+30 210 1234567", GR, "+302101234567", id="LRM-first"),
    pytest.param("+30 694 123 4567\u200f", GR, "+306941234567", id="RLM-last"),
    pytest.param("\u202a+30 694 123 4567\u202c", GR, "+306941234567", id="LRE-PDF-whatsapp"),
    pytest.param("\u2068+30 694 123 4567\u2069", GR, "+306941234567", id="FSI-PDI"),
    pytest.param("210\u200b1234567", GR, "+302101234567", id="zero-width-space"),
    pytest.param("210\u00ad123\u00ad4567", GR, "+302101234567", id="soft-hyphen"),
    pytest.param("\ufeff2101234567", GR, "+302101234567", id="BOM"),
    # An extension gives the main number: a CRM record "210 1234567 ext. 12" is reached
    # through, and called back from, +30 210 1234567; an incoming call from it must find
    # the record, and None would lose the match entirely. (German "-0"/"-12" suffixes are
    # direct-dial digits, tested above.)
    pytest.param("210 1234567 ext. 12", GR, "+302101234567", id="GR-ext."),
    pytest.param("+302101234567;ext=12", GR, "+302101234567", id="GR-rfc3966-ext"),
    pytest.param("tel:+302101234567;ext=12", GR, "+302101234567", id="GR-tel-ext"),
    pytest.param("+44 20 7946 0958 ext. 123", GB, "+442079460958", id="GB-ext."),
    pytest.param("(415) 555-2671 x123", US, "+14155552671", id="US-x"),
    pytest.param("415-555-2671 ext. 5", US, "+14155552671", id="US-ext."),
    # A doubled trunk zero gives the number: no German or Austrian national number starts
    # with 0, so the second 0 can only be the trunk prefix again; at the very least the
    # result must not be a third string that matches neither the record nor itself once
    # normalised again.
    pytest.param("+49 (0)030 1234567", DE, "+49301234567", id="trunk-twice-DE"),
    pytest.param("+49 (0)030 1234567", GR, "+49301234567", id="trunk-twice-GR-CRM"),
    pytest.param("0049 (0)030 1234567", GR, "+49301234567", id="trunk-twice-GR-CRM-0049"),
    pytest.param("+49 (0) 0171 1234567", DE, "+491711234567", id="trunk-twice-DE-mobile"),
    pytest.param("+43 (0)01 5123456", AT, "+4315123456", id="trunk-twice-AT"),
    pytest.param("+43 (0)0664 1234567", AT, "+436641234567", id="trunk-twice-AT-mobile"),
    # A local number without any area code is never a match: it cannot be written in E.164
    # ("+15552671" is no callable number), and the same 7 digits exist in every US area
    # code: matching them would link callers of different cities to one record.
    pytest.param("555-2671", US, None, id="US-local-no-area-code"),
    pytest.param("5552671", US, None, id="US-local-digits-no-area-code"),
    pytest.param("1234567", US_SF, None, id="US/415-local-cannot-start-with-1"),
    pytest.param("7946 0958", GB, None, id="GB-local-no-area-code"),
    # More than fifteen digits is never a match: E.164 allows at most 15, a longer string
    # is no number anyone can call.
    pytest.param("+49 30 12345678 9012", DE, None, id="16-digits-DE"),
    pytest.param("030 12345678 9012", DE_BERLIN, None, id="16-digits-DE/30"),
    pytest.param("+49 30 12345678 9012", GR, None, id="16-digits-GR-CRM"),
    # A US-style international number in Germany: more than 8 digits without trunk 0 is a
    # national number missing its 0 (by design), but then 16 digits are too many.
    pytest.param("011 30 210 123 4567", DE, None, id="16-digits-DE-US-style-011"),
]


@pytest.mark.parametrize(("raw", "where", "expected"), ALSO_WRITTEN)
def test_what_people_also_write(raw: str, where: Dialling, expected: str | None) -> None:
    assert normalise(raw, where) == expected


# ---------------------------------------------------------------------------------------------
# Properties: never raises, only E.164, idempotent
# ---------------------------------------------------------------------------------------------

DIALLED = st.text(alphabet="0123456789 +-().#*/\u00a0", max_size=24)
TOKENS = st.lists(
    st.sampled_from([
        "+", "00", "011", "0", "010", "01013", "0100", "30", "49", "1", "44", "41", "43",
        "210", "694", "171", "415", "1234567", "555", "2671", "12", " ", "-", "(", ")", "(0)",
        "#", "*", "tel:", "sip:", "@", "\u00a0", "\u2013", "ext. ", "x",
    ]),
    max_size=10,
).map("".join)
TEXTS = st.one_of(st.text(max_size=40), DIALLED, TOKENS)
#: Bounded, and without a .hypothesis example database in the project directory.
BOUNDED = settings(max_examples=500, deadline=None, database=None)
DIGITS_ONLY = re.compile(r"\+[1-9][0-9]+")


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@BOUNDED
@given(raw=TEXTS)
def test_normalise_never_raises(where: Dialling, raw: str) -> None:
    """Total on any text; whatever comes out is "+" and digits (the length is checked below)."""
    out = normalise(raw, where)
    assert out is None or DIGITS_ONLY.fullmatch(out), (raw, out)


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@BOUNDED
@given(raw=TEXTS)
@example(raw="+49 30 12345678 9012")
def test_normalise_returns_e164_or_none(where: Dialling, raw: str) -> None:
    out = normalise(raw, where)
    assert out is None or E164.fullmatch(out), (raw, out)


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@BOUNDED
@given(raw=TEXTS)
@example(raw="+49 (0)030 1234567")
def test_normalise_is_idempotent(where: Dialling, raw: str) -> None:
    out = normalise(raw, where)
    if out is not None:
        assert normalise(out, where) == out, (raw, out)


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
def test_normalise_is_idempotent_on_realistic_numbers(where: Dialling) -> None:
    """Every spelling of the tables above, seen anywhere: a result that normalises to itself.

    (Not all are E.164 yet: see test_more_than_fifteen_digits_is_never_a_match.)"""
    for raw in sorted({raw for raw, _, _ in SAME_NUMBER}):
        out = normalise(raw, where)
        if out is not None:
            assert DIGITS_ONLY.fullmatch(out), (raw, out)
            assert normalise(out, where) == out, (raw, out)


@pytest.mark.parametrize("where", PLACES, ids=_where_id)
@BOUNDED
@given(raw=st.one_of(st.none(), st.text(max_size=40)))
def test_withheld_never_matches(where: Dialling, raw: str | None) -> None:
    if is_withheld(raw):
        assert normalise(raw, where) is None


def test_text_longer_than_any_crm_phone_column_is_not_a_number() -> None:
    # parsing cost grows with the length: a long field must not cost seconds
    assert normalise("6912345678" + " " * 91) is None
    assert normalise("+30 691 234 5678" + " " * 84) == "+306912345678"


def test_a_number_normalised_again_in_another_country_is_read_there() -> None:
    """Normalised numbers are remembered (issue 21): by the text and where it was seen,
    never by the text alone."""
    assert normalise("030 1234567", Dialling("DE")) == "+49301234567"
    assert normalise("030 1234567", Dialling("GR")) is None
    assert normalise("030 1234567", Dialling("DE")) == "+49301234567"
    assert normalise("1234567", Dialling("DE", "30")) == "+49301234567"
    assert normalise("1234567", Dialling("DE", "89")) == "+49891234567"


def test_remembering_normalised_numbers_keeps_memory_bounded() -> None:
    """A flood of distinct callers cannot grow the remembered numbers without end."""
    import tracemalloc

    tracemalloc.start()
    try:
        for n in range(NORMALISED_CACHE):  # the cache full, of numbers traced, first
            normalise(f"+30 69{n:08d}")
        # A first flood settles the cache's own table: one made before tracing began is
        # rebuilt at some point (a quarter of a megabyte counted once, not growth).
        for n in range(20_000):
            normalise(f"+30 69{n + 10**7:08d}")
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20_000):
            normalise(f"+30 69{n + 2 * 10**7:08d}")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, f"grew by {grown} bytes"


def test_the_directorys_parses_leave_the_callers_numbers_remembered() -> None:
    """A directory build parses every number of the CRM once; remembering those would push
    the callers' numbers out of the remembered ones (issue 21)."""
    from dpvoip.core import numbers
    from dpvoip.core.matching import SOURCE_BY_NAME, entries

    caller = "+30 691 000 0001"
    normalise(caller)
    for n in range(NORMALISED_CACHE + 10):
        entries(SOURCE_BY_NAME["company"], n, [f"210 {n:07d}"], Dialling("GR"))
    hits = numbers._remembered.cache_info().hits
    assert normalise(caller) == "+306910000001"
    assert numbers._remembered.cache_info().hits == hits + 1
