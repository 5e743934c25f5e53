"""The dialling policy: ordinary landlines and mobiles of the countries a Greek office calls
are dialled (in whatever local form they are typed), premium-rate, satellite and other
blocked ranges are refused with a message naming the number and why, and for arbitrary
text ``check`` never raises and only ever allows an E.164 number."""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dpvoip.core.dialling_policy import (
    DEFAULT_BLOCKED_PREFIXES,
    MAX_INPUT_CHARS,
    DiallingPolicy,
    Verdict,
)
from dpvoip.core.numbers import Dialling

GR, DE, AT, CH = Dialling("GR"), Dialling("DE"), Dialling("AT"), Dialling("CH")
GB, IT, FR, ES = Dialling("GB"), Dialling("IT"), Dialling("FR"), Dialling("ES")
DEFAULT = DiallingPolicy()
E164 = re.compile(r"\+[1-9][0-9]{6,14}")

# ---------------------------------------------------------------------------------------------
# Allowed: ordinary numbers, local spellings normalised with the office's Dialling
# ---------------------------------------------------------------------------------------------

ALLOWED: list[tuple[str, Dialling, str]] = [
    # Greece: landlines (Athens, Thessaloniki), mobile; national, international, 00 forms.
    ("210 1234567", GR, "+302101234567"),
    ("2310 123456", GR, "+302310123456"),
    ("697 123 4567", GR, "+306971234567"),
    ("+30 210 123 4567", GR, "+302101234567"),
    ("0030 210 1234567", GR, "+302101234567"),
    ("1234567", Dialling("GR", "210"), "+302101234567"),
    # Germany: Berlin, Munich, mobile, the (0) people write, a call-by-call prefix.
    ("030 1234567", DE, "+49301234567"),
    ("089 12345678", DE, "+498912345678"),
    ("0151 23456789", DE, "+4915123456789"),
    ("+49 (0)30 1234567", DE, "+49301234567"),
    ("12345678", Dialling("DE", "30"), "+493012345678"),
    # Austria: Vienna, Graz, mobile.
    ("01 5123456", AT, "+4315123456"),
    ("0316 123456", AT, "+43316123456"),
    ("0664 1234567", AT, "+436641234567"),
    # Switzerland: Zurich, mobile.
    ("044 123 45 67", CH, "+41441234567"),
    ("079 123 45 67", CH, "+41791234567"),
    # United Kingdom: London, Manchester, mobile.
    ("020 7946 0018", GB, "+442079460018"),
    ("0161 496 0000", GB, "+441614960000"),
    ("07400 123456", GB, "+447400123456"),
    # Italy: Rome and Milan keep their leading 0 after +39; mobile.
    ("06 1234 5678", IT, "+390612345678"),
    ("02 1234 5678", IT, "+390212345678"),
    ("347 123 4567", IT, "+393471234567"),
    # France: Paris, mobile.
    ("01 42 68 53 00", FR, "+33142685300"),
    ("06 12 34 56 78", FR, "+33612345678"),
    # Spain: Madrid, mobile.
    ("91 123 45 67", ES, "+34911234567"),
    ("612 34 56 78", ES, "+34612345678"),
    # Numbers of another country typed at a Greek office.
    ("+49 30 1234567", GR, "+49301234567"),
    ("0044 20 7946 0018", GR, "+442079460018"),
    # Shared-cost customer lines are not premium (see DiallingPolicy's docstring).
    ("801 123 4567", GR, "+308011234567"),
    ("902 12 34 56", ES, "+34902123456"),
]


@pytest.mark.parametrize(("raw", "where", "expected"), ALLOWED,
                         ids=[f"{w.region}:{r}" for r, w, _ in ALLOWED])
def test_ordinary_numbers_are_dialled_in_e164(raw: str, where: Dialling, expected: str) -> None:
    verdict = DEFAULT.check(raw, where)
    assert verdict == Verdict(expected, None)
    assert verdict.allowed


# ---------------------------------------------------------------------------------------------
# Blocked prefixes: one real-looking number in each default range
# ---------------------------------------------------------------------------------------------

#: A number in each default blocked range, as phonenumbers formats it, and what it is.
IN_BLOCKED_RANGE: dict[str, tuple[str, str]] = {
    "+30901": ("+30 901 123 4567", "premium-rate"),
    "+30909": ("+30 909 123 4567", "premium-rate"),
    "+3070": ("+30 70 1234 5678", "personal (follow-me)"),
    "+49900": ("+49 900 1 123456", "premium-rate"),
    "+49137": ("+49 137 7 123456", "premium-rate (televoting)"),
    "+43900": ("+43 900 123456", "premium-rate"),
    "+43901": ("+43 901 123456", "premium-rate"),
    "+43930": ("+43 930 123456", "premium-rate"),
    "+43931": ("+43 931 123456", "premium-rate"),
    "+43939": ("+43 939 123456", "premium-rate"),
    "+41900": ("+41 900 123 456", "premium-rate"),
    "+41901": ("+41 901 123 456", "premium-rate"),
    "+41906": ("+41 906 123 456", "premium-rate"),
    "+44908": ("+44 908 123 4567", "premium-rate"),
    "+44909": ("+44 909 123 4567", "premium-rate"),
    "+44871": ("+44 871 123 4567", "premium-rate"),
    "+44872": ("+44 872 123 4567", "premium-rate"),
    "+44873": ("+44 873 123 4567", "premium-rate"),
    "+4470": ("+44 70 1234 5678", "personal (follow-me)"),
    "+39892": ("+39 892 123", "premium-rate"),
    "+39899": ("+39 899 123 456", "premium-rate"),
    "+3389": ("+33 891 12 34 56", "premium-rate"),
    "+34803": ("+34 803 12 34 56", "premium-rate"),
    "+34806": ("+34 806 12 34 56", "premium-rate"),
    "+34807": ("+34 807 12 34 56", "premium-rate"),
    "+34905": ("+34 905 12 34 56", "premium-rate (televoting)"),
    "+870": ("+870 301 234 567", "satellite"),
    "+881": ("+881 6 123 45678", "satellite"),
    "+882": ("+882 16 12 3456", "international network"),
    "+883": ("+883 510 012 345", "international network"),
    "+979": ("+979 1 2345 6789", "international premium-rate"),
}


def test_every_default_range_has_a_case() -> None:
    assert set(IN_BLOCKED_RANGE) == set(DEFAULT_BLOCKED_PREFIXES)


@pytest.mark.parametrize("prefix", DEFAULT_BLOCKED_PREFIXES)
def test_each_default_blocked_range_is_refused_by_its_prefix(prefix: str) -> None:
    shown, kind = IN_BLOCKED_RANGE[prefix]
    # Refused by the prefix alone: with the metadata's premium check off as well.
    policy = DiallingPolicy(block_premium=False)
    verdict = policy.check(shown, GR)
    assert not verdict.allowed
    assert verdict.number is None
    article = "an" if kind[0] in "aeiou" else "a"
    assert verdict.refusal == f"{shown} is {article} {kind} number"


def test_national_forms_of_blocked_numbers_are_refused_too() -> None:
    assert DEFAULT.check("0900 1 123456", DE).refusal == "+49 900 1 123456 is a premium-rate number"
    assert DEFAULT.check("901 123 4567", GR).refusal == "+30 901 123 4567 is a premium-rate number"
    assert DEFAULT.check("070 1234 5678", GB).refusal == (
        "+44 70 1234 5678 is a personal (follow-me) number")
    assert DEFAULT.check("0891 12 34 56", FR).refusal == "+33 891 12 34 56 is a premium-rate number"


def test_a_configured_prefix_is_refused_and_named() -> None:
    policy = DiallingPolicy(blocked_prefixes=("+30210",))
    assert policy.check("210 1234567", GR).refusal == (
        "+30 21 0123 4567 is in a blocked range (+30210)")
    assert policy.check("2310 123456", GR).allowed


def test_default_ranges_never_block_the_ordinary_numbers_of_any_country() -> None:
    """The prefixes are country-specific: no region's example landline or mobile is hit."""
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            example_number = phonenumbers.example_number_for_type(region, kind)
            if example_number is None:
                continue
            e164 = phonenumbers.format_number(example_number, phonenumbers.PhoneNumberFormat.E164)
            assert not e164.startswith(DEFAULT_BLOCKED_PREFIXES), (region, kind, e164)


# ---------------------------------------------------------------------------------------------
# Premium-rate by the phonenumbers metadata, whatever the prefix list says
# ---------------------------------------------------------------------------------------------

PREMIUM_NOT_LISTED: list[tuple[str, Dialling, str]] = [
    ("0812 34 56 78", FR, "+33 812 34 56 78"),  # France 081x-088x
    ("0836 12 34 56", FR, "+33 836 12 34 56"),
    ("144 123 456", IT, "+39 144 123 456"),  # Italy 144, 166
    ("166 123 456", IT, "+39 166 123 456"),
    ("0844 123 4567", GB, "+44 844 123 4567"),  # UK 084x/087x, as the metadata has it
    ("0870 123 4567", GB, "+44 870 123 4567"),
    ("0862 123456", AT, "+43 862 123456"),  # Austria 86x/89x
    ("0901 123 456", CH, "+41 901 123 456"),
]


@pytest.mark.parametrize(("raw", "where", "shown"), PREMIUM_NOT_LISTED,
                         ids=[s for _, _, s in PREMIUM_NOT_LISTED])
def test_premium_rate_by_metadata_is_refused_without_a_prefix(
    raw: str, where: Dialling, shown: str
) -> None:
    without_prefixes = DiallingPolicy(blocked_prefixes=())
    assert without_prefixes.check(raw, where) == Verdict(None, f"{shown} is a premium-rate number")
    # ... and that check is what refuses them: switched off, they are dialled.
    anything_valid = DiallingPolicy(blocked_prefixes=(), block_premium=False)
    assert anything_valid.check(raw, where).allowed


def test_block_premium_off_still_refuses_listed_ranges() -> None:
    assert not DiallingPolicy(block_premium=False).check("+30 901 123 4567", GR).allowed


# ---------------------------------------------------------------------------------------------
# Allowed countries
# ---------------------------------------------------------------------------------------------

def test_only_allowed_countries_are_dialled() -> None:
    policy = DiallingPolicy(allowed_countries=frozenset({"GR", "DE"}))
    assert policy.check("210 1234567", GR).allowed
    assert policy.check("+49 30 1234567", GR).allowed
    assert policy.check("+355 4 222 3456", GR) == Verdict(
        None, "calls to Albania are not allowed")
    assert policy.check("+44 20 7946 0018", GR).refusal == (
        "calls to United Kingdom are not allowed")
    assert policy.check("+800 1234 5678", GR).refusal == (
        "calls to numbers of no country (+800) are not allowed")


def test_allowed_countries_are_upper_cased_and_checked() -> None:
    policy = DiallingPolicy(allowed_countries=frozenset({"gr", " de "}))
    assert policy.allowed_countries == frozenset({"GR", "DE"})
    with pytest.raises(ValueError, match="UK"):
        DiallingPolicy(allowed_countries=frozenset({"UK"}))


def test_a_region_sharing_a_country_code_is_its_own_country() -> None:
    """Jersey dials as +44 but is not the United Kingdom (nor priced like it)."""
    policy = DiallingPolicy(allowed_countries=frozenset({"GB"}))
    assert policy.check("+44 20 7946 0018", GR).allowed
    assert policy.check("+44 7797 123456", GR).refusal == "calls to Jersey are not allowed"


def test_no_allowed_countries_means_any_country() -> None:
    assert DEFAULT.check("+355 4 222 3456", GR).allowed
    assert DEFAULT.check("+1 202 555 0123", GR).allowed


# ---------------------------------------------------------------------------------------------
# Not numbers, invalid numbers, lengths
# ---------------------------------------------------------------------------------------------

REFUSED: list[tuple[str, Dialling, str]] = [
    ("", GR, "no number given"),
    ("   \t", GR, "no number given"),
    ("abc", GR, "'abc' is not a phone number"),
    ("call me", GR, "'call me' is not a phone number"),
    ("anonymous", GR, "'anonymous' is not a phone number"),
    ("sip:100@pbx.example", GR, "'sip:100@pbx.example' is not a phone number"),
    ("*21#", GR, "'*21#' is not a phone number"),
    ("\x00\x1b[31m210", GR, "'??[31m210' is not a phone number"),
    ("12345", GR, "'12345' is too short for a phone number"),
    ("+30 21", GR, "'+30 21' is too short for a phone number"),
    ("1234567890123456789", GR, "'1234567890123456789' is too long for a phone number"),
    ("+30 21012345", GR, "+30 21012345 is not a valid number for Greece"),
    ("+30 2101234", GR, "+30 2101234 is not a valid number for Greece"),
    ("07700 900123", GB, "+44 7700 900123 is not a valid number for United Kingdom"),
    ("+49 30 0", GR, "'+49 30 0' is too short for a phone number"),
    ("+1 202 555 01", GR, "+1 20255501 is not a valid number for United States"),
]


@pytest.mark.parametrize(("raw", "where", "refusal"), REFUSED, ids=[r for r, _, _ in REFUSED])
def test_what_is_no_valid_number_is_refused(raw: str, where: Dialling, refusal: str) -> None:
    assert DEFAULT.check(raw, where) == Verdict(None, refusal)


def test_garbage_is_echoed_at_most_32_characters() -> None:
    refusal = DEFAULT.check("x" * 10_000, GR).refusal
    assert refusal == f"'{'x' * 32}...' is not a phone number"
    refusal = DEFAULT.check("1 " * 5_000, GR).refusal
    assert refusal is not None
    assert len(refusal) < 60


def test_min_and_max_digits_count_the_whole_e164_number() -> None:
    # +30 210 1234567 has 12 digits, country code included.
    assert DiallingPolicy(min_digits=12, max_digits=12).check("210 1234567", GR).allowed
    assert DiallingPolicy(min_digits=13).check("210 1234567", GR).refusal == (
        "+30 21 0123 4567 is too short (at least 13 digits)")
    assert DiallingPolicy(max_digits=11).check("210 1234567", GR).refusal == (
        "+30 21 0123 4567 is too long (at most 11 digits)")
    # Short national numbers: Austrian landlines of 7 digits after +43.
    assert DiallingPolicy(max_digits=10).check("0316 123456", AT).refusal == (
        "+43 316 123456 is too long (at most 10 digits)")


@pytest.mark.parametrize(
    "settings",
    [
        {"min_digits": 0},
        {"min_digits": 10, "max_digits": 9},
        {"blocked_prefixes": ("30901",)},
        {"blocked_prefixes": ("+0901",)},
        {"blocked_prefixes": ("+30 901",)},
        {"allowed_countries": frozenset({"Greece"})},
    ],
)
def test_a_malformed_policy_is_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DiallingPolicy(**settings)  # type: ignore[arg-type]


def test_verdict_has_either_a_number_or_a_refusal() -> None:
    assert Verdict("+302101234567", None).allowed
    assert not Verdict(None, "no").allowed
    with pytest.raises(ValueError):
        Verdict(None, None)
    with pytest.raises(ValueError):
        Verdict("+302101234567", "no")


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

NUMBERISH = st.text(alphabet="0123456789 +()-./", max_size=24)
PLACES = st.sampled_from([GR, DE, AT, CH, GB, IT, FR, ES, Dialling("GR", "210"),
                          Dialling("DE", "30"), Dialling("US")])
POLICIES = st.builds(
    DiallingPolicy,
    allowed_countries=st.frozensets(st.sampled_from(["GR", "DE", "GB", "IT", "001"])),
    block_premium=st.booleans(),
)


@given(raw=st.one_of(st.text(max_size=80), NUMBERISH), where=PLACES, policy=POLICIES)
@example(raw="+30 901 123 4567", where=GR, policy=DEFAULT)
@example(raw="\u200b\u202e+302101234567", where=GR, policy=DEFAULT)
@example(raw="+" + "9" * 40, where=GR, policy=DEFAULT)
def test_check_never_raises_and_only_allows_e164(
    raw: str, where: Dialling, policy: DiallingPolicy
) -> None:
    verdict = policy.check(raw, where)
    if verdict.allowed:
        assert verdict.number is not None
        assert E164.fullmatch(verdict.number)
        assert not verdict.number.startswith(policy.blocked_prefixes)
        parsed = phonenumbers.parse(verdict.number)
        assert phonenumbers.is_valid_number(parsed)
        if policy.block_premium:
            assert phonenumbers.number_type(parsed) != phonenumbers.PhoneNumberType.PREMIUM_RATE
    else:
        assert verdict.refusal
        # The refusal repeats no more than a short part of what was typed.
        assert len(verdict.refusal) <= 32 + 60


@given(raw=st.text(min_size=MAX_INPUT_CHARS + 1, max_size=2_000), where=PLACES)
def test_long_input_is_refused_without_echoing_it(raw: str, where: Dialling) -> None:
    verdict = DEFAULT.check(raw, where)
    if verdict.allowed:  # only surrounding whitespace made it long
        assert len(raw.strip()) <= MAX_INPUT_CHARS
    else:
        assert verdict.refusal is not None
        assert len(verdict.refusal) <= 32 + 60


@given(
    region=st.sampled_from(["GR", "DE", "AT", "CH", "GB", "IT", "FR", "ES"]),
    kind=st.sampled_from([phonenumbers.PhoneNumberType.FIXED_LINE,
                          phonenumbers.PhoneNumberType.MOBILE]),
)
def test_example_landlines_and_mobiles_are_allowed_in_every_form(
    region: str, kind: int
) -> None:
    number = phonenumbers.example_number_for_type(region, kind)
    assert number is not None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    international = phonenumbers.format_number(
        number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    for raw, where in ((national, Dialling(region)), (international, GR), (e164, DE)):
        assert DEFAULT.check(raw, where) == Verdict(e164, None), (raw, where)


def test_country_names_come_without_the_world_s_geocoding_data() -> None:
    """phonenumbers' geodata is ~90 MiB once imported: more than the daemon's whole memory
    target. The whole daemon is imported in a fresh interpreter and must not load it."""
    import subprocess
    import sys

    found = subprocess.run(
        [sys.executable, "-c", "import sys, dpvoip.service, dpvoip.cli;"
         " print(sorted(m for m in sys.modules if m.startswith('phonenumbers.geodata')))"],
        capture_output=True, text=True, check=True, timeout=120)
    assert found.stdout.strip() == "[]"


def test_regions_iso_does_not_list_still_have_names() -> None:
    policy = DiallingPolicy(allowed_countries=frozenset({"GR"}))
    assert policy.check("+383 44 123 456", GR) == Verdict(
        None, "calls to Kosovo are not allowed")
