"""The call list parser on what boxes send: every type, withheld callers, the TAM, short
and long durations, a year change, odd entries skipped and counted, and documents that
are refused (XML bombs, external entities, DTDs, too big, not a list) without echoing
them."""

from __future__ import annotations

from datetime import datetime

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.fritzbox.calllist import (
    ACTIVE_INCOMING,
    ACTIVE_OUTGOING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    CallList,
    CallListError,
    ListedCall,
    parse_call_list,
    parse_date,
    parse_duration,
)

#: A list as a FRITZ!Box 7590 (FRITZ!OS 7.x) sends it, numbers masked, newest first.
BOX_LIST = b"""<?xml version="1.0" encoding="utf-8"?>
<root>
<timestamp>1718620800</timestamp>
<Call><Id>108</Id><Type>11</Type><Called>06912345678</Called><Caller>SIP: 2107654321</Caller>
<CallerNumber>2107654321</CallerNumber><Name></Name><Numbertype>sip</Numbertype>
<Device>Telefon Empfang</Device><Port>11</Port><Date>02.01.25 09:15</Date>
<Duration>0:00</Duration><Count></Count><Path /></Call>
<Call><Id>107</Id><Type>10</Type><Caller>2101112223</Caller><Called>2107654321</Called>
<CalledNumber>2107654321</CalledNumber><Name></Name><Numbertype>sip</Numbertype><Device>
</Device><Port>-1</Port><Date>02.01.25 09:01</Date><Duration>0:00</Duration><Count></Count>
<Path /></Call>
<Call><Id>106</Id><Type>1</Type><Caller>06987654321</Caller><Called>2107654321</Called>
<CalledNumber>2107654321</CalledNumber><Name>Papadopoulos</Name><Numbertype>sip</Numbertype>
<Device>Anrufbeantworter 1</Device><Port>40</Port><Date>01.01.25 00:03</Date>
<Duration>0:01</Duration><Count></Count>
<Path>/download.lua?path=/data/tam/rec/rec.0.000</Path></Call>
<Call><Id>105</Id><Type>2</Type><Caller></Caller><Called>2107654321</Called>
<CalledNumber>2107654321</CalledNumber><Name></Name><Numbertype>sip</Numbertype><Device>
</Device><Port></Port><Date>31.12.24 23:58</Date><Duration>0:00</Duration><Count></Count>
<Path /></Call>
<Call><Id>104</Id><Type>3</Type><Called>2310555666</Called><Caller>SIP: 2107654321</Caller>
<CallerNumber>2107654321</CallerNumber><Name>Kostas</Name><Numbertype>sip</Numbertype>
<Device>Telefon Empfang</Device><Port>11</Port><Date>31.12.24 17:20</Date>
<Duration>12:34</Duration><Count></Count><Path /></Call>
<Call><Id>103</Id><Type>9</Type><Caller>2105556667</Caller><Called>2107654321</Called>
<CalledNumber>2107654321</CalledNumber><Name></Name><Numbertype>sip</Numbertype>
<Device>DECT 1</Device><Port>10</Port><Date>31.12.24 17:00</Date><Duration>0:05</Duration>
<Count></Count><Path /></Call>
</root>
"""


class ParseTests(SynchronousTestCase):
    def test_a_box_list_reads_into_its_entries_newest_first(self) -> None:
        parsed = parse_call_list(BOX_LIST)
        self.assertEqual(parsed.timestamp, 1718620800)
        self.assertEqual(parsed.skipped, 0)
        self.assertEqual([call.id for call in parsed.calls], [108, 107, 106, 105, 104, 103])
        self.assertEqual([call.type for call in parsed.calls],
                         [ACTIVE_OUTGOING, BLOCKED, INCOMING, MISSED, OUTGOING,
                          ACTIVE_INCOMING])

    def test_the_remote_party_is_called_for_outgoing_and_caller_for_incoming(self) -> None:
        calls = {call.id: call for call in parse_call_list(BOX_LIST).calls}
        self.assertEqual((calls[104].remote, calls[104].own_number), ("2310555666", "2107654321"))
        self.assertEqual((calls[108].remote, calls[108].own_number),
                         ("06912345678", "2107654321"))
        self.assertEqual((calls[106].remote, calls[106].own_number),
                         ("06987654321", "2107654321"))
        self.assertEqual(calls[107].remote, "2101112223")

    def test_a_withheld_caller_is_empty(self) -> None:
        calls = {call.id: call for call in parse_call_list(BOX_LIST).calls}
        self.assertEqual(calls[105].remote, "")
        self.assertEqual(calls[105].direction, "incoming")

    def test_the_whole_entry(self) -> None:
        calls = {call.id: call for call in parse_call_list(BOX_LIST).calls}
        self.assertEqual(calls[106], ListedCall(
            id=106, type=INCOMING, remote="06987654321", own_number="2107654321",
            name="Papadopoulos", device="Anrufbeantworter 1", port="40",
            date=datetime(2025, 1, 1, 0, 3), duration_seconds=60))

    def test_directions_activity_and_the_answering_machine(self) -> None:
        calls = {call.id: call for call in parse_call_list(BOX_LIST).calls}
        self.assertEqual([calls[i].direction for i in (104, 108, 103, 107)],
                         ["outgoing", "outgoing", "incoming", "incoming"])
        self.assertEqual([i for i in calls if calls[i].active], [108, 103])
        self.assertTrue(calls[106].by_machine())
        self.assertFalse(calls[104].by_machine())
        self.assertTrue(calls[104].by_machine({"11"}))

    def test_durations_and_dates_across_the_year_change(self) -> None:
        calls = {call.id: call for call in parse_call_list(BOX_LIST).calls}
        self.assertEqual(calls[104].duration_seconds, 12 * 3600 + 34 * 60)
        self.assertEqual(calls[103].duration_seconds, 300)
        self.assertEqual(calls[105].date, datetime(2024, 12, 31, 23, 58))
        self.assertEqual(calls[106].date, datetime(2025, 1, 1, 0, 3))
        self.assertEqual(calls[107].device, "")  # whitespace only

    def test_an_empty_list(self) -> None:
        self.assertEqual(parse_call_list(b"<root><timestamp>5</timestamp></root>"),
                         CallList(5, ()))

    def test_missing_optional_elements_are_empty(self) -> None:
        parsed = parse_call_list(b"<root><timestamp>7</timestamp><Call><Id>1</Id>"
                                 b"<Type>2</Type><Date>03.04.25 10:00</Date></Call></root>")
        self.assertEqual(parsed.calls, (ListedCall(1, MISSED, "", "", "", "", "",
                                                   datetime(2025, 4, 3, 10, 0), 0),))

    def test_an_unknown_type_is_kept_as_given(self) -> None:
        parsed = parse_call_list(b"<root><timestamp>7</timestamp><Call><Id>1</Id>"
                                 b"<Type>4</Type><Caller>123</Caller>"
                                 b"<Date>03.04.25 10:00</Date></Call></root>")
        self.assertEqual((parsed.calls[0].type, parsed.calls[0].direction), (4, "incoming"))


class SkippedEntryTests(SynchronousTestCase):
    def entry(self, inner: str) -> bytes:
        good = ("<Call><Id>9</Id><Type>1</Type><Caller>1</Caller>"
                "<Date>01.02.25 10:00</Date><Duration>0:02</Duration></Call>")
        return f"<root><timestamp>1</timestamp>{good}<Call>{inner}</Call></root>".encode()

    def assert_skipped(self, inner: str) -> None:
        parsed = parse_call_list(self.entry(inner))
        self.assertEqual(([call.id for call in parsed.calls], parsed.skipped), ([9], 1))

    def test_no_id(self) -> None:
        self.assert_skipped("<Type>1</Type><Date>01.02.25 10:00</Date>")

    def test_an_id_that_is_no_number(self) -> None:
        self.assert_skipped("<Id>x1</Id><Type>1</Type><Date>01.02.25 10:00</Date>")

    def test_id_zero(self) -> None:
        self.assert_skipped("<Id>0</Id><Type>1</Type><Date>01.02.25 10:00</Date>")

    def test_no_type(self) -> None:
        self.assert_skipped("<Id>3</Id><Date>01.02.25 10:00</Date>")

    def test_a_bad_date(self) -> None:
        self.assert_skipped("<Id>3</Id><Type>1</Type><Date>31.02.25 10:00</Date>")
        self.assert_skipped("<Id>3</Id><Type>1</Type><Date>2025-02-01 10:00</Date>")
        self.assert_skipped("<Id>3</Id><Type>1</Type>")

    def test_a_bad_duration(self) -> None:
        self.assert_skipped("<Id>3</Id><Type>1</Type><Date>01.02.25 10:00</Date>"
                            "<Duration>0:75</Duration>")


class FieldTests(SynchronousTestCase):
    def test_dates(self) -> None:
        self.assertEqual(parse_date("17.06.20 10:28"), datetime(2020, 6, 17, 10, 28))
        self.assertEqual(parse_date("1.6.2020 9:05"), datetime(2020, 6, 1, 9, 5))
        self.assertIsNone(parse_date("17.06.20 10:28:29"))
        self.assertIsNone(parse_date("17.13.20 10:28"))
        self.assertIsNone(parse_date(""))

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("0:01"), 60)
        self.assertEqual(parse_duration("12:34"), 45240)
        self.assertEqual(parse_duration("0:00"), 0)
        self.assertIsNone(parse_duration("1:60"))
        self.assertIsNone(parse_duration("75"))


class RefusedTests(SynchronousTestCase):
    def assert_refused(self, data: bytes, words: str) -> CallListError:
        error: CallListError = self.assertRaises(CallListError, parse_call_list, data)
        self.assertIn(words, str(error))
        self.assertLess(len(str(error)), 200)
        return error

    def test_not_xml(self) -> None:
        error = self.assert_refused(b"<html><body>" + b"A" * 5000, "not XML")
        self.assertNotIn("AAAAAAAAAA", str(error))

    def test_another_document(self) -> None:
        self.assert_refused(b"<html><timestamp>1</timestamp></html>", "<html>")

    def test_no_timestamp(self) -> None:
        self.assert_refused(b"<root><Call><Id>1</Id></Call></root>", "timestamp")
        self.assert_refused(b"<root><timestamp>soon</timestamp></root>", "timestamp")

    def test_too_big(self) -> None:
        data = b"<root><timestamp>1</timestamp>" + b" " * 200 + b"</root>"
        error = self.assertRaises(CallListError, parse_call_list, data, max_bytes=100)
        self.assertIn("larger than 100 bytes", str(error))
        self.assertEqual(parse_call_list(data, max_bytes=len(data)).timestamp, 1)
        self.assertIn("larger than 4000000 bytes",
                      str(self.assertRaises(CallListError, parse_call_list, b" " * 4_000_001)))

    def test_the_billion_laughs_is_refused(self) -> None:
        bomb = (b'<?xml version="1.0"?><!DOCTYPE root [<!ENTITY a "aaaaaaaaaa">'
                b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
                b"<root><timestamp>1</timestamp><Call><Id>1</Id><Name>&c;</Name></Call></root>")
        self.assert_refused(bomb, "DTD or entities")

    def test_an_external_entity_is_refused(self) -> None:
        xxe = (b'<?xml version="1.0"?><!DOCTYPE root [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               b"<root><timestamp>1</timestamp><Call><Id>1</Id><Name>&x;</Name></Call></root>")
        self.assert_refused(xxe, "DTD or entities")

    def test_a_bare_dtd_is_refused(self) -> None:
        self.assert_refused(b'<!DOCTYPE root SYSTEM "http://example.org/x.dtd">'
                            b"<root><timestamp>1</timestamp></root>", "DTD")
