"""AMI framing with plain data: the banner, messages, repeated keys, responses and events,
bounds, actions as bytes and the MD5 login key."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.asterisk.messages import (
    Message,
    MessageReader,
    NotAsterisk,
    Refused,
    action,
    md5_key,
)


def read(reader: MessageReader, text: str) -> list[Message | Refused]:
    out = []
    for line in text.split("\r\n"):
        got = reader.feed(line)
        if got is not None:
            out.append(got)
    return out


class ReaderTests(SynchronousTestCase):
    def test_banner_then_a_response_and_an_event(self) -> None:
        reader = MessageReader()
        got = read(reader, "Asterisk Call Manager/9.0.0\r\n"
                   "Response: Success\r\nActionID: dpvoip-1\r\nMessage: Authentication "
                   "accepted\r\n\r\nEvent: Hangup\r\nPrivilege: call,all\r\nChannel: "
                   "PJSIP/201-00000002\r\nCause-txt: Normal Clearing\r\nCause: 16\r\n\r\n")
        self.assertEqual(reader.version, "9.0.0")
        response, event = got
        assert isinstance(response, Message) and isinstance(event, Message)
        self.assertTrue(response.is_response)
        self.assertFalse(response.is_event)
        self.assertEqual(response.action_id, "dpvoip-1")
        self.assertEqual(response.get("message"), "Authentication accepted")  # any case
        self.assertTrue(event.is_event)
        self.assertEqual((event.event, event.get("Cause-txt"), event.get("Cause")),
                         ("Hangup", "Normal Clearing", "16"))

    def test_repeated_keys_are_kept_in_order(self) -> None:
        reader = MessageReader(banner="Asterisk Call Manager/9.0.0")
        [event] = read(reader, "Event: VarSet\r\nChanVariable: A=1\r\nChanVariable: B=2\r\n"
                       "Value: x: y\r\n\r\n")
        assert isinstance(event, Message)
        self.assertEqual(event.get_all("ChanVariable"), ["A=1", "B=2"])
        self.assertEqual(event.get("ChanVariable"), "A=1")
        self.assertEqual(event.get("Value"), "x: y")  # only the first colon splits

    def test_not_an_asterisk(self) -> None:
        with self.assertRaises(NotAsterisk) as raised:
            MessageReader().feed("SSH-2.0-OpenSSH_9.2")
        self.assertIn("SSH-2.0", str(raised.exception))

    def test_a_message_over_the_bounds_is_refused_whole_and_the_next_one_read(self) -> None:
        reader = MessageReader(banner="Asterisk Call Manager/9.0.0", max_lines=10)
        flood = "".join(f"Key{n}: {n}\r\n" for n in range(1000))
        got = read(reader, "Event: Flood\r\n" + flood + "\r\nEvent: Ok\r\n\r\n")
        self.assertEqual(got[0], Refused("more than 10 lines", 1001))
        assert isinstance(got[1], Message)
        self.assertEqual(got[1].event, "Ok")
        self.assertLessEqual(reader.pending_lines, 10)

    def test_a_message_over_the_byte_bound(self) -> None:
        reader = MessageReader(banner="Asterisk Call Manager/9.0.0", max_bytes=100)
        got = read(reader, "Event: Big\r\nData: " + "x" * 200 + "\r\n\r\n")
        self.assertIsInstance(got[0], Refused)

    def test_empty_lines_between_messages_make_nothing(self) -> None:
        reader = MessageReader(banner="Asterisk Call Manager/9.0.0")
        self.assertEqual(read(reader, "\r\n\r\n\r\n"), [])


class ActionTests(SynchronousTestCase):
    def test_an_action_as_bytes(self) -> None:
        self.assertEqual(
            action("Originate", [("Channel", "PJSIP/201"), ("Variable", "A=1"),
                                 ("Variable", "B=2")], "dpvoip-7"),
            b"Action: Originate\r\nActionID: dpvoip-7\r\nChannel: PJSIP/201\r\n"
            b"Variable: A=1\r\nVariable: B=2\r\n\r\n")

    def test_a_line_break_in_a_value_is_refused_naming_the_key_not_the_value(self) -> None:
        with self.assertRaises(ValueError) as raised:
            action("Login", [("Secret", "s3cret\r\nAction: Originate")])
        self.assertIn("Secret", str(raised.exception))
        self.assertNotIn("s3cret", str(raised.exception))

    def test_md5_key_as_the_login_documentation_computes_it(self) -> None:
        # The key is md5(challenge + secret), lower-case hex (Asterisk 20, Login action).
        self.assertEqual(md5_key("", ""), "d41d8cd98f00b204e9800998ecf8427e")
        self.assertEqual(md5_key("840415273", "mysecret"),
                         md5_key("840415273" + "my", "secret"))
        self.assertNotEqual(md5_key("840415273", "mysecret"),
                            md5_key("840415274", "mysecret"))
