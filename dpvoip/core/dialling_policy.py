"""Whether click-to-call may dial a number at the company's expense.

The system being replaced dialled whatever number a link carried, so one crafted link could
make the company pay for minutes on a premium-rate line (whose owner is paid per minute).
Every number is therefore normalised to E.164 with :func:`dpvoip.numbers.normalise` and
refused when it is not a valid number, falls in a blocked range, is classified premium-rate
by the ``phonenumbers`` metadata, or lies outside the allowed countries.

Pure: no I/O; the ``phonenumbers`` metadata is the only source of numbering plans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from dpvoip.core.numbers import Dialling, normalise

#: The region code ``phonenumbers`` gives numbers of no country (+800, +870, +882, ...).
NON_GEOGRAPHIC = "001"

#: What each default range is, for the refusal message ("+30 901 ... is <this>"). Ranges the
#: ``phonenumbers`` metadata (9.0.x) classifies PREMIUM_RATE are marked "(pn)": listed all the
#: same so they stay refused with ``block_premium`` off or older metadata. The others are
#: there because the metadata does not know them or does not call them premium.
_DEFAULT_RANGES: dict[str, str] = {
    # Greece: 901 and 909 are the whole premium range the metadata knows (90[19]) (pn).
    "+30901": "a premium-rate number",
    "+30909": "a premium-rate number",
    # Germany: 0900 (dialled nationally, +49 900 in E.164) (pn); 0137 mass calling/televoting
    # (1377-1379 pn, 1371-1376 shared cost in the metadata: still charged per call).
    "+49900": "a premium-rate number",
    "+49137": "a premium-rate (televoting) number",
    # Austria: 900, 901, 930, 931, 939 (pn).
    "+43900": "a premium-rate number",
    "+43901": "a premium-rate number",
    "+43930": "a premium-rate number",
    "+43931": "a premium-rate number",
    "+43939": "a premium-rate number",
    # Greece: 70 "personal numbers" (follow-me, billed above a normal call).
    "+3070": "a personal (follow-me) number",
    # Switzerland: 900, 901, 906 (pn).
    "+41900": "a premium-rate number",
    "+41901": "a premium-rate number",
    "+41906": "a premium-rate number",
    # United Kingdom: 908, 909, 871-873 (pn); 070 "personal numbers" are billed like premium
    # lines and known from scams, yet the metadata calls them PERSONAL_NUMBER.
    "+44908": "a premium-rate number",
    "+44909": "a premium-rate number",
    "+44871": "a premium-rate number",
    "+44872": "a premium-rate number",
    "+44873": "a premium-rate number",
    "+4470": "a personal (follow-me) number",
    # Italy: 892, 899 (pn).
    "+39892": "a premium-rate number",
    "+39899": "a premium-rate number",
    # France: 089x (pn).
    "+3389": "a premium-rate number",
    # Spain: 803, 806, 807 (pn); 905 mass calling/televoting (unknown to the metadata).
    "+34803": "a premium-rate number",
    "+34806": "a premium-rate number",
    "+34807": "a premium-rate number",
    "+34905": "a premium-rate (televoting) number",
    # No country: Inmarsat, global mobile satellite systems (Iridium, Globalstar, Thuraya
    # under +881/+882), international networks, international premium-rate (pn).
    "+870": "a satellite number",
    "+881": "a satellite number",
    "+882": "an international network number",
    "+883": "an international network number",
    "+979": "an international premium-rate number",
}

#: Premium-rate, satellite and international-network ranges: a default for an office in
#: Greece calling Europe. E.164 prefixes with the leading '+'.
DEFAULT_BLOCKED_PREFIXES: tuple[str, ...] = tuple(_DEFAULT_RANGES)

#: Longer input is not a number someone typed or pasted (and normalising it costs time).
MAX_INPUT_CHARS = 64
#: How much of a refused input a message repeats.
_ECHO_CHARS = 32
_PREFIX = re.compile(r"\+[1-9][0-9]{0,14}")
#: Only what people write around the digits of a number.
_NUMBER_LIKE = re.compile(r"[0-9+()\s./-]+")


@dataclass(frozen=True)
class Verdict:
    """The answer of :meth:`DiallingPolicy.check`: a number to dial or the reason not to."""

    #: The E.164 number to dial, with its '+', when allowed.
    number: str | None
    #: A message for the user when refused; names the number and the reason.
    refusal: str | None

    def __post_init__(self) -> None:
        if (self.number is None) == (self.refusal is None):
            raise ValueError("a verdict has either a number or a refusal")

    @property
    def allowed(self) -> bool:
        return self.number is not None


@dataclass(frozen=True)
class DiallingPolicy:
    """Which numbers click-to-call may dial.

    ``block_premium`` refuses what the metadata classifies PREMIUM_RATE (in every country,
    so ranges missing from ``blocked_prefixes`` are caught too) but not SHARED_COST: those
    are businesses' ordinary customer lines (GR 801, ES 902, DE 0180) charged near national
    rates, which a CRM legitimately calls; add their prefixes to ``blocked_prefixes`` to
    refuse them. Note that the metadata counts UK 084x/087x as premium-rate.

    ``min_digits``/``max_digits`` count the digits of the E.164 number, country code
    included: the form Zadarma accepts is 7 to 15 of them.

    Region codes are upper-cased and prefixes stripped on construction; an unknown region or a
    malformed prefix raises ValueError, because a typo ("UK") would silently refuse a country.
    """

    #: ISO region codes that may be dialled (``"001"`` for numbers of no country); empty: any.
    allowed_countries: frozenset[str] = frozenset()
    #: E.164 prefixes with the leading '+' never dialled.
    blocked_prefixes: tuple[str, ...] = DEFAULT_BLOCKED_PREFIXES
    block_premium: bool = True
    min_digits: int = 7
    max_digits: int = 15

    def __post_init__(self) -> None:
        countries = frozenset(code.strip().upper() for code in self.allowed_countries)
        unknown = sorted(
            code for code in countries
            if code != NON_GEOGRAPHIC and code not in phonenumbers.SUPPORTED_REGIONS
        )
        if unknown:
            raise ValueError(f"unknown region codes {unknown} (use ISO codes such as 'GB')")
        prefixes = tuple(prefix.strip() for prefix in self.blocked_prefixes)
        malformed = [prefix for prefix in prefixes if not _PREFIX.fullmatch(prefix)]
        if malformed:
            raise ValueError(f"prefixes not in E.164 form such as '+30901': {malformed}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        object.__setattr__(self, "allowed_countries", countries)
        object.__setattr__(self, "blocked_prefixes", prefixes)

    def check(self, raw: str, where: Dialling) -> Verdict:
        """``raw`` as typed or linked, read as a number dialled from ``where``."""
        text = raw.strip()
        if not text:
            return _refuse("no number given")
        number = normalise(text, where) if len(text) <= MAX_INPUT_CHARS else None
        if number is None:
            return _refuse(self._unreadable(text, where))
        digits = len(number) - 1
        parsed = phonenumbers.parse(number)
        shown = phonenumbers.format_number(parsed, PhoneNumberFormat.INTERNATIONAL)
        if digits < self.min_digits:
            return _refuse(f"{shown} is too short (at least {self.min_digits} digits)")
        if digits > self.max_digits:
            return _refuse(f"{shown} is too long (at most {self.max_digits} digits)")
        for prefix in self.blocked_prefixes:
            if number.startswith(prefix):
                kind = _DEFAULT_RANGES.get(prefix)
                if kind is None:
                    return _refuse(f"{shown} is in a blocked range ({prefix})")
                return _refuse(f"{shown} is {kind}")
        if not phonenumbers.is_valid_number(parsed):
            return _refuse(f"{shown} is not a valid number{_for_country(parsed)}")
        if self.block_premium and (
            phonenumbers.number_type(parsed) == PhoneNumberType.PREMIUM_RATE
        ):
            return _refuse(f"{shown} is a premium-rate number")
        region = phonenumbers.region_code_for_number(parsed) or NON_GEOGRAPHIC
        if self.allowed_countries and region not in self.allowed_countries:
            if region == NON_GEOGRAPHIC:
                return _refuse(f"calls to numbers of no country (+{parsed.country_code}) "
                               "are not allowed")
            return _refuse(f"calls to {_country_name(region)} are not allowed")
        return Verdict(number, None)

    def _unreadable(self, text: str, where: Dialling) -> str:
        """Why ``text`` is no number to dial, repeating at most a short, printable part."""
        echo = "".join(ch if ch.isprintable() else "?" for ch in text[:_ECHO_CHARS])
        if len(text) > _ECHO_CHARS:
            echo += "..."
        if len(text) > MAX_INPUT_CHARS or not _NUMBER_LIKE.fullmatch(text):
            return f"'{echo}' is not a phone number"
        digits = sum(ch.isdigit() for ch in text) - (2 if text.startswith("00") else 0)
        if digits < self.min_digits:
            return f"'{echo}' is too short for a phone number"
        if digits > self.max_digits:
            return f"'{echo}' is too long for a phone number"
        try:  # digits of a sensible length: say for which country they are no number
            parsed = phonenumbers.parse(text, where.region)
        except phonenumbers.NumberParseException:
            return f"'{echo}' is not a phone number"
        shown = phonenumbers.format_number(parsed, PhoneNumberFormat.INTERNATIONAL)
        return f"{shown} is not a valid number{_for_country(parsed)}"


def _refuse(message: str) -> Verdict:
    return Verdict(None, message)


def _for_country(number: phonenumbers.PhoneNumber) -> str:
    """`` for Greece``: the country a number's code belongs to (its main one if shared)."""
    region = phonenumbers.region_code_for_number(number) or (
        phonenumbers.region_code_for_country_code(number.country_code or 0)
    )
    if region in (NON_GEOGRAPHIC, phonenumbers.UNKNOWN_REGION):
        return ""
    return f" for {_country_name(region)}"


#: Regions with their own calling codes that ISO 3166-1 does not list.
_NOT_IN_ISO = {"AC": "Ascension Island", "TA": "Tristan da Cunha", "XK": "Kosovo"}


def _country_name(region: str) -> str:
    """The English name of ``region`` ("Albania"), or the code if none is known.

    From pycountry (a few MiB), not from phonenumbers' geocoding data: importing that
    loads every prefix of the world, about 90 MiB, which alone is more than the daemon's
    whole memory target. Imported on the first refusal that names a country, not with
    the daemon: its tables are 8 MiB of RSS, for the text of a refusal.
    """
    import pycountry

    country = pycountry.countries.get(alpha_2=region)
    if country is None:
        return _NOT_IN_ISO.get(region, region)
    return str(getattr(country, "common_name", None) or country.name)
