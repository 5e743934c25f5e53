"""``dpvoip check``'s look at a PBX: one login with the configured user, whether it may
list the channels (``CoreShowChannels``, as a reconnect does), then ``Logoff``.

``dpvoip check`` builds nothing and starts no service, and what it says of a provider
comes from the kind's ``check_lines``, which is synchronous. So this is a short blocking
exchange on a plain socket (TLS when configured), bounded by ``timeout`` for each step:
the banner, ``Challenge`` (MD5), ``Login`` with ``Events: off`` (no call events during
the look), ``CoreShowChannels``, ``Logoff``. It tells what the daemon's log would: the
PBX refused the login (a wrong secret, a host ``permit`` leaves out), nothing listens, no
answer, not an AMI; and whether a reconnect can follow the calls on.
Never the secret: the messages name the user and the PBX's own reason only.

A wrong secret costs one failed login on the PBX (fail2ban counts them), as each retry of
the daemon does.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from dpvoip.asterisk.messages import Message, MessageReader, NotAsterisk, action, md5_key
from dpvoip.asterisk.settings import AsteriskSettings

#: Most bytes read in one look: a login's answers are a few hundred, the channels'
#: list a few hundred each.
MAX_READ = 256 * 1024
#: What the look says of ``CoreShowChannels`` (a reconnect's list of the PBX's channels).
LISTABLE = "calls followed on through a reconnect, and the ones begun meanwhile recorded"
NOT_LISTABLE = ("the channels cannot be listed (add reporting to write in manager.conf): "
                "a reconnect closes the calls in progress as interrupted, and the calls "
                "begun while the link was down are not recorded")


def login_refused_text(username: str, reason: str) -> str:
    """What a refused login is called, in the daemon's status and in ``dpvoip check``."""
    return (f"the PBX refused the login of user {username!r} ({reason}): check username "
            "and secret, and the user's permit/deny in manager.conf")


@dataclass(frozen=True)
class Looked:
    """What one look found: ``ok`` and a line saying it (no secret)."""

    ok: bool
    text: str


class _Problem(Exception):
    pass


Connect = Callable[[tuple[str, int], float], socket.socket]


def look(settings: AsteriskSettings, timeout: float = 5.0,
         connect: Connect = socket.create_connection) -> Looked:
    """Log in once as ``settings`` say, and log off."""
    address = (settings.host.strip("[]"), settings.port)
    try:
        sock = connect(address, timeout)
    except OSError as error:
        return Looked(False, f"cannot connect to {_shown(settings)}: "
                             f"{error.strerror or error}")
    try:
        sock.settimeout(timeout)
        if settings.tls:
            sock = ssl.create_default_context().wrap_socket(
                sock, server_hostname=address[0])
        return _login(_Lines(sock), settings)
    except _Problem as problem:
        return Looked(False, str(problem))
    except NotAsterisk:
        return Looked(False, f"{_shown(settings)} is not an Asterisk Manager Interface "
                             "(no AMI banner): is this the AMI port (5038)?")
    except TimeoutError:
        return Looked(False, f"{_shown(settings)} did not answer within {timeout:g} s")
    except ssl.SSLError as error:
        return Looked(False, f"TLS with {_shown(settings)} failed: {error.reason or error}")
    except OSError as error:
        return Looked(False, f"the connection to {_shown(settings)} failed: "
                             f"{error.strerror or error}")
    finally:
        sock.close()


def _shown(settings: AsteriskSettings) -> str:
    host = settings.host
    return f"[{host}]:{settings.port}" if ":" in host and not host.startswith("[") \
        else f"{host}:{settings.port}"


def _login(lines: _Lines, settings: AsteriskSettings) -> Looked:
    lines.next_message()  # the banner (the reader keeps its version)
    version = lines.reader.version
    fields = [("Username", settings.username)]
    if settings.auth == "md5":
        challenge = lines.ask("Challenge", [("AuthType", "MD5")], "1")
        if challenge.response.lower() != "success":
            raise _Problem(f"the PBX refused the MD5 challenge ({challenge.get('Message')})")
        fields += [("AuthType", "MD5"),
                   ("Key", md5_key(challenge.get("Challenge"), settings.secret.reveal()))]
    else:
        fields.append(("Secret", settings.secret.reveal()))
    fields.append(("Events", "off"))
    answer = lines.ask("Login", fields, "2")
    if answer.response.lower() != "success":
        return Looked(False, login_refused_text(
            settings.username, answer.get("Message") or "Authentication failed"))
    # Whether the channels can be listed, as a reconnect will ask (asterisk.service).
    try:
        listable = lines.ask("CoreShowChannels", [], "3").response.lower() == "success"
    except _Problem:
        listable = False
    # Logged in is what was asked; the PBX may close before its Goodbye.
    with contextlib.suppress(OSError, _Problem):
        lines.ask("Logoff", [], "4")
    return Looked(True, f"logged in as {settings.username!r} (AMI {version or '?'}); "
                        + (LISTABLE if listable else NOT_LISTABLE))


class _Lines:
    """Messages read from a blocking socket, through the AMI reader."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._read = 0
        self.reader = MessageReader()

    def ask(self, name: str, fields: list[tuple[str, str]], action_id: str) -> Message:
        self._sock.sendall(action(name, fields, action_id))
        while True:
            got = self.next_message()
            if got.is_response and got.action_id == action_id:
                return got

    def next_message(self) -> Message:
        """The next whole message (the banner counts as one, empty)."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                had_banner = self.reader.banner is not None
                got = self.reader.feed(line.rstrip(b"\r").decode("utf-8", "replace"))
                if not had_banner and self.reader.banner is not None:
                    return Message(())
                if isinstance(got, Message):
                    return got
            chunk = self._sock.recv(4096)
            self._read += len(chunk)
            if not chunk:
                raise _Problem("the PBX closed the connection")
            if self._read > MAX_READ:
                raise _Problem("the PBX sent too much before answering")
            self._buffer += chunk
