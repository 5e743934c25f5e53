"""Every private Twisted or txpostgres hook dpvoip relies on, and only here.

Each is reached directly (never ``getattr(obj, "_name", default)``): when a new Twisted
renames one, dpvoip must fail loudly, in ``test/test_internals.py`` (one contract test per
hook, on the real objects) and not silently in production. ``setup.py`` caps Twisted,
Klein and txpostgres at the versions these were checked with:

- Twisted 26.10.0 (the floor, 24.7.0, has the same names but one: see
  ``leave_form_to_caller``),
- txpostgres 1.7.0,
- klein 24.8.0 and treq 26.7.0: dpvoip uses no private attribute of theirs.

Before raising a cap: run ``test/test_internals.py`` on the new version, then read the
functions below against its source.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application.internet import ClientService
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.web import client, http


def forget_exit_signal(reactor: Any) -> None:
    """Make twistd exit 0 after SIGTERM (``systemctl stop`` is a normal stop).

    The reactor stores the signal that stopped it in ``_exitSignal``
    (``twisted.internet.interfaces._ISupportsExitSignalCapturing``); twistd's runner reads
    it after the run and kills itself with it (exit status 143). No public way exists to
    say "this signal was a clean stop". The attribute is read before it is cleared, so a
    reactor without it raises ``AttributeError`` instead of being silently ignored.
    """
    if reactor._exitSignal is not None:
        reactor._exitSignal = None


def request_line(channel: http.HTTPChannel) -> tuple[bytes, bytes]:
    """The method and the target of the request a channel is reading, before Twisted has
    handed them to its Request (a request refused for its body size is logged with them).

    ``HTTPChannel`` keeps them in ``_command`` and ``_path`` from the request line until
    the whole body has arrived (``allContentReceived`` deletes them), and the Request gets
    them only then (``requestReceived``): a request refused earlier has no public record
    of what it asked for.
    """
    command: bytes = channel._command
    path: bytes = channel._path
    return command, path


def has_unread_bytes(channel: http.HTTPChannel) -> bool:
    """Whether bytes of a next (pipelined) request arrived with the current one.

    ``HTTPChannel`` buffers them in ``_dataBuffer`` (while a request is handled) and in
    ``LineReceiver._buffer`` (a partial line): the next request's deadline starts with
    them, not with the next ``dataReceived``.
    """
    buffered: bytes = channel._buffer
    pending: list[bytes] = channel._dataBuffer
    return bool(buffered or pending)


def leave_form_to_caller(request: http.Request) -> None:
    """Stop ``Request.requestReceived`` from parsing a form body into ``request.args``.

    Twisted's public switch is a constructor argument (``parsePOSTFormSubmission``), but
    whether to parse is known only once the headers are in: dpvoip reads the common
    ``application/x-www-form-urlencoded`` webhook form itself (Twisted reads every
    Content-Type with Python's email package, which costs more than the rest of the
    parsing) and leaves multipart forms to Twisted. The constructor stores the switch in
    ``_parsePOSTFormSubmission``, which ``requestReceived`` reads. Twisted 24.x has no such
    switch: there the form is parsed twice, into the same ``args``, only more slowly.
    """
    request._parsePOSTFormSubmission = False


class ChannelHooks(http.HTTPChannel):
    """``HTTPChannel`` with the two private methods dpvoip overrides given public names.

    ``_send100Continue`` writes the interim ``100 Continue`` when a request's headers ask
    for it: dpvoip must not send it after it has already refused the request.
    ``_respondToBadRequestAndDisconnect`` answers every malformed request (bad request
    line, too many or too long headers, broken chunking, an unreadable multipart body)
    with a bare 400: dpvoip answers in its own JSON shape.
    """

    def may_send_continue(self) -> bool:
        """Whether the ``100 Continue`` Twisted is about to send may go out."""
        return True

    def answer_malformed(self) -> None:
        """Answer a request Twisted cannot parse, and disconnect (Twisted's own way by
        default)."""
        super()._respondToBadRequestAndDisconnect()

    def _send100Continue(self) -> None:
        if self.may_send_continue():
            super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.answer_malformed()


def raw_connection(connection: Any) -> Any:
    """The psycopg2 connection behind a txpostgres ``Connection``: None before the first
    ``connect``, then the current one (a new object after each reconnection; ``closed``
    once it is gone).

    txpostgres keeps it in ``Connection._connection`` and has no documented accessor;
    ``pollable()``, the method its polling mixin and the reactor call, returns it. The
    pool uses it to tell a live connection from a dead one and a reconnected session
    (whose prepared statements are gone) from the one it prepared them on.
    """
    return connection.pollable()  # a psycopg2 connection (typed Any: only store/ imports
    # the drivers)


_log = Logger(namespace="dpvoip.store.pool")


def tolerate_closed_descriptors(reactor: Any) -> None:
    """Make the epoll reactor forget a descriptor that was closed while it watched it.

    libpq closes the socket of a session it finds broken, sometimes while the reactor
    still watches it (``store.pool`` unwatches it first wherever it can see it coming). The
    kernel then drops it from epoll by itself, and ``EPollReactor._remove`` (the private
    method behind ``removeReader``/``removeWriter``) deletes its selectable, then fails in
    ``epoll_ctl`` (EBADF, or ENOENT once the number is reused) before it takes the number
    out of its ``_reads``/``_writes`` sets. Those sets then name a descriptor without a
    selectable: every later ``removeAll`` raises ``KeyError`` and a new socket given the
    same number is never watched. Here a failed ``epoll_ctl`` in a removal completes the
    bookkeeping (the kernel has forgotten the descriptor already) and says so in the log.

    Reached directly: an instance attribute wraps the reactor's own method, once.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor) or "_remove" in vars(reactor):
        return
    remove = reactor._remove

    def tolerant_remove(xer: Any, primary: set[int], other: set[int],
                        selectables: dict[int, Any], event: int, antievent: int) -> None:
        fd = xer.fileno()
        if fd == -1:
            fd = next((n for n, known in selectables.items() if known is xer), -1)
        try:
            remove(xer, primary, other, selectables, event, antievent)
        except OSError as error:
            primary.discard(fd)
            other.discard(fd)
            selectables.pop(fd, None)
            _log.warn("descriptor {fd} was closed while the reactor watched it ({error});"
                      " forgotten", fd=fd, error=error.strerror or str(error))

    reactor._remove = tolerant_remove  # type: ignore[method-assign]


def _retry_lines_as_debug(event: dict[str, Any]) -> None:
    """A ``ClientService``'s events, its "Scheduling retry" line at the debug level."""
    if str(event.get("log_format", "")).startswith("Scheduling retry "):
        event = {**event, "log_level": LogLevel.debug}
    globalLogPublisher(event)


class QuietClientService(ClientService):
    """``ClientService`` without its own info line at every failed attempt.

    Twisted logs ``Scheduling retry 3 to connect <HostnameEndpoint fritz.box:1012> in
    3.9578956107266103 seconds.`` without the reason, at every attempt: dpvoip tells the
    reason and the delay itself, calmly (``FritzBox.connect_failed``). The machine takes
    the service's ``_log`` (a class attribute, read by ``ClientService.__init__``); this
    one publishes Twisted's line at the debug level (still an event, with its ``attempt``
    and ``delay`` fields, for whoever observes them: the fault tests do) and every other
    event (a duplicate start's warning) as it is.
    """

    _log = Logger(observer=cast(ILogObserver, _retry_lines_as_debug))


def twistd_options(maker: Any) -> type[Any]:
    """twistd's ``ServerOptions`` whose only subcommand is ``maker`` (dpvoip's own service
    maker): what ``dpvoip run`` hands to twistd.

    Plain twistd offers every plugin of every installed package as a subcommand: it reads
    them through ``ServerOptions._getPlugins`` (``twisted.plugin.getPlugins``), and reading
    the plugin cache imports the interfaces the other plugins provide: Twisted's trial
    (and with it the standard ``unittest``), words, cred's checkers: half a megabyte of
    the daemon's memory for commands it never runs. The class attribute is the one place
    the plugins are read; ``twistd dpvoip`` keeps working as before. The options are the
    POSIX ones (``twisted.scripts.twistd`` picks them by platform but does not export
    them), the only ones a daemon of this office runs with.
    """
    from twisted.scripts._twistd_unix import ServerOptions

    class DpvoipServerOptions(ServerOptions):
        @staticmethod
        def _getPlugins(interface: Any, package: Any = None) -> list[Any]:
            return [maker]

    return DpvoipServerOptions


class _QuietHTTP11ClientFactory(client._HTTP11ClientFactory):
    noisy = False


class QuietHTTPConnectionPool(client.HTTPConnectionPool):
    """``HTTPConnectionPool`` whose connections do not log ``Starting factory
    _HTTP11ClientFactory(...)`` and ``Stopping factory ...`` each time (every TR-064
    request and every Zadarma API connection: two lines of noise each).

    The pool makes its protocol factory from the class attribute ``_factory``
    (``_HTTP11ClientFactory``, whose ``noisy`` is Twisted's default, True); there is no
    public way to give the pool another.
    """

    _factory = _QuietHTTP11ClientFactory
