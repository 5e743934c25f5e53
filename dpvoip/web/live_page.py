"""The live page (``GET /voip/``) and the CRM's screen pop (``GET /voip/popup.js``).

The page is rendered here, whole, from one snapshot of the database
(``store.live_page``): the calls in progress, today's calls, the open missed-call tickets
and each Fritz!Box's state. Then dpvoip's own script (``static/live.js``) follows the
event stream (``events``, relative: the page works under whatever prefix the CRM's
reverse proxy gives ``/voip/``) and changes the rows in place. Rows rendered here and rows
the script builds have the same shape, so the script can update either.

Every number and name is escaped; the page allows nothing but its own files
(``Content-Security-Policy: default-src 'self'``: no inline script or style, no other
site), and the words the script needs travel as data (a ``data-words`` attribute), not as
code. Who is asking is decided as for click-to-call (``click_to_call.logins``): a CRM
session cookie, a JWT or a dpvoip token; anyone else gets a 401 page with a link to the
CRM's sign-in.

``popup.js`` is a static script for the CRM's base template; it asks ``popup.json`` (the
signed-in user's settings: whom to pop up for, their phones, the words) and listens to
the same stream. Rendering is pure (``render_page``, ``popup_settings``); ``LivePages``
is the thin edge that reads, renders and answers.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote
from zoneinfo import ZoneInfo

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dpvoip.click_to_call.errors import DatabaseUnreachable, from_database
from dpvoip.click_to_call.logins import NotSignedIn
from dpvoip.config import PageSettings
from dpvoip.core.outcomes import Outcome
from dpvoip.core.texts import LANGUAGES, PAGE_WORDS
from dpvoip.live.events import call_data, page_resume_id
from dpvoip.live.snapshot import (
    Client,
    LiveBox,
    LiveCall,
    LiveTicket,
    Ringing,
    Snapshot,
    Viewer,
)
from dpvoip.web.callback import LoginService
from dpvoip.web.errors import HttpError, error_answer, json_body

log = Logger()

#: The page loads nothing but dpvoip's own files and talks to nothing but dpvoip.
PAGE_HEADERS: Mapping[bytes, bytes] = {
    b"Content-Security-Policy": b"default-src 'self'; base-uri 'none'; form-action 'none';"
                                b" frame-ancestors 'self'; object-src 'none'",
    b"X-Frame-Options": b"SAMEORIGIN",
    b"Referrer-Policy": b"same-origin",
    b"X-Content-Type-Options": b"nosniff",
    b"Cache-Control": b"no-store",
}
#: dpvoip's files under ``/voip/static/`` (and ``/voip/popup.js``), by name.
STATIC_TYPES: Mapping[str, str] = {
    "live.js": "text/javascript; charset=utf-8",
    "live.css": "text/css; charset=utf-8",
    "popup.js": "text/javascript; charset=utf-8",
}


class LiveReads(Protocol):
    """The page's reads (``store.live_page.LivePageReads``)."""

    def viewer(self, user_id: int) -> Awaitable[Viewer]: ...

    def snapshot(self, day_start: datetime, viewer: int | None, recent: int,
                 tickets: int) -> Awaitable[Snapshot]: ...

    def ringing(self, viewer: int | None) -> Awaitable[Ringing]: ...


# --- the words -----------------------------------------------------------------------------


def page_words(language: str) -> dict[str, str]:
    """Every word the page and its scripts show, in ``language``: the page's own, the
    outcomes (``outcome_answered`` ... keyed by ``Outcome`` value, as the stream sends
    them) and the withheld caller, as the call's notes say them."""
    words = dict(PAGE_WORDS[language])
    catalog = LANGUAGES[language]
    for outcome in Outcome:
        words[f"outcome:{outcome.value}"] = catalog["outcome_" + outcome.name.lower()]
    words["withheld"] = catalog["withheld"]
    return words


# --- rendering (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class PageView:
    """How the page shows what it shows: the words, the office's zone, the client link."""

    language: str
    zone: ZoneInfo
    client_url: str
    recent_limit: int

    @property
    def words(self) -> dict[str, str]:
        return page_words(self.language)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def client_link(pattern: str, client_id: int) -> str:
    """The CRM's page of the client: ``{id}`` of ``[page] client_url`` replaced."""
    return pattern.replace("{id}", quote(str(client_id), safe=""))


def clock_time(moment: datetime | None, zone: ZoneInfo) -> str:
    return "" if moment is None else moment.astimezone(zone).strftime("%H:%M:%S")


def day_time(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%d/%m %H:%M")


def talk_time(seconds: int | None) -> str:
    """``1:05``, ``1:02:03``; empty when unknown."""
    if seconds is None:
        return ""
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(number: str, words: Mapping[str, str]) -> str:
    return number or words["withheld"]


def _client_cell(client: Client | None, view: PageView) -> str:
    if client is None:
        return "<td class='c-client'></td>"
    name = client.name or f"#{client.id}"
    return (f"<td class='c-client'><a href='{_e(client_link(view.client_url, client.id))}'>"
            f"{_e(name)}</a></td>")


def _call_row(call: LiveCall, view: PageView, words: Mapping[str, str]) -> str:
    cells = [
        f"<td class='c-time'>{_e(clock_time(call.at, view.zone))}</td>",
        f"<td class='c-direction'>{_e(words.get('direction_' + call.direction, call.direction))}"
        "</td>",
        f"<td class='c-number'>{_e(_number(call.number, words))}</td>",
        _client_cell(call.client, view),
    ]
    if call.state == "ended":
        outcome = words.get(f"outcome:{call.outcome}", call.outcome or call.status)
        cells += [f"<td class='c-outcome'>{_e(outcome)}</td>",
                  f"<td class='c-duration'>{_e(talk_time(call.duration))}</td>"]
    else:
        cells += [f"<td class='c-box'>{_e(call.box or '')}</td>",
                  f"<td class='c-extension'>{_e(call.extension or '')}</td>",
                  f"<td class='c-state'>{_e(words['state_' + call.state])}</td>"]
    outcome_class = f" outcome-{call.outcome.replace(' ', '-')}" if call.outcome else ""
    return (f"<tr data-call='{_e(call.call_id)}' class='call state-{_e(call.state)}"
            f"{_e(outcome_class)}'>{''.join(cells)}</tr>")


def _ticket_row(ticket: LiveTicket, view: PageView, words: Mapping[str, str]) -> str:
    return (f"<tr data-ticket='{ticket.ticket_id}' class='ticket'>"
            f"<td class='t-opened'>{_e(day_time(ticket.created_at, view.zone))}</td>"
            f"<td class='t-number'>{_e(_number(ticket.number, words))}</td>"
            f"{_client_cell(ticket.client, view)}"
            f"<td class='t-count'>{ticket.count}</td></tr>")


def _box_item(box: LiveBox, view: PageView, words: Mapping[str, str]) -> str:
    state = "connected" if box.connected else "disconnected"
    since = (words["box_since"].format(time=day_time(box.since, view.zone))
             if box.since is not None else "")
    return (f"<li data-box='{_e(box.box)}' class='box {state}'>"
            f"<span class='b-name'>{_e(box.box)}</span> "
            f"<span class='b-state'>{_e(words['box_' + state])}</span> "
            f"<span class='b-since'>{_e(since)}</span></li>")


def _table(body_id: str, heads: list[str], rows: list[str], empty: str,
           words: Mapping[str, str]) -> str:
    head = "".join(f"<th>{_e(words[h])}</th>" for h in heads)
    hidden = " hidden" if rows else ""
    return (f"<table><thead><tr>{head}</tr></thead><tbody id='{body_id}'>{''.join(rows)}"
            f"</tbody></table><p class='empty' data-empty-for='{body_id}'{hidden}>"
            f"{_e(words[empty])}</p>")


def render_page(snapshot: Snapshot, view: PageView, resume: int | None = None) -> bytes:
    """The whole page, every value escaped; the script finds its settings in ``<body>``'s
    data attributes (``resume``: the id its first stream starts after, see
    ``live.events.page_resume_id``)."""
    words = view.words
    in_progress = [_call_row(c, view, words) for c in snapshot.in_progress]
    recent = [_call_row(c, view, words) for c in snapshot.recent]
    tickets = [_ticket_row(t, view, words) for t in snapshot.tickets]
    boxes = [_box_item(b, view, words) for b in snapshot.boxes]
    data = {
        "words": json.dumps(words, ensure_ascii=False),
        "client-url": view.client_url,
        "zone": view.zone.key,
        "lang": view.language,
        "recent-limit": str(view.recent_limit),
        **({} if resume is None else {"last-event-id": str(resume)}),
    }
    attributes = " ".join(f"data-{name}='{_e(value)}'" for name, value in data.items())
    page = (
        f"<!doctype html><html lang='{_e(view.language)}'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(words['title'])}</title>"
        "<link rel='stylesheet' href='static/live.css'>"
        "<script src='static/live.js' defer></script></head>"
        f"<body {attributes}><header><h1>{_e(words['title'])}</h1>"
        f"<span id='stream-state' class='stream-state'></span></header><main>"
        f"<section id='boxes-section'><h2>{_e(words['boxes'])}</h2>"
        f"<ul id='boxes'>{''.join(boxes)}</ul><p class='empty' data-empty-for='boxes'"
        f"{' hidden' if boxes else ''}>{_e(words['none_boxes'])}</p></section>"
        f"<section><h2>{_e(words['in_progress'])}</h2>"
        + _table("in-progress", ["col_time", "col_direction", "col_number", "col_client",
                                 "col_line", "col_extension", "col_state"],
                 in_progress, "none_in_progress", words)
        + f"</section><section><h2>{_e(words['recent'])}</h2>"
        + _table("recent", ["col_time", "col_direction", "col_number", "col_client",
                            "col_outcome", "col_duration"], recent, "none_recent", words)
        + f"</section><section><h2>{_e(words['tickets'])}</h2>"
        + _table("tickets", ["col_opened", "col_number", "col_client", "col_count"],
                 tickets, "none_tickets", words)
        + "</section></main></body></html>"
    )
    return page.encode("utf-8")


def signed_out_page(view: PageView, login: str, why: str) -> bytes:
    words = view.words
    return (
        f"<!doctype html><html lang='{_e(view.language)}'><head><meta charset='utf-8'>"
        f"<title>{_e(words['title'])}</title></head><body><p>{_e(words['signed_out'])}</p>"
        f"<p>{_e(why)}</p><p><a href='{_e(login)}'>{_e(words['sign_in'])}</a></p>"
        "</body></html>"
    ).encode()


def popup_settings(viewer: Viewer, settings: PageSettings, language: str,
                   ringing: Ringing | None = None, resume: int | None = None
                   ) -> dict[str, Any]:
    """What ``popup.js`` needs to know about the signed-in user (``popup.json``): also the
    calls ringing now (a page opened while a call rings pops it up at once: the CRM's
    pages come and go, and each one's script starts anew) in the stream's wire format,
    and the id its stream resumes after (the events since that read)."""
    words = page_words(language)
    return {
        "ringing": [call_data(call_id=c.call_id, state=c.state, direction=c.direction,
                              number=c.number,
                              client=None if c.client is None else {
                                  "id": c.client.id, "name": c.client.name},
                              extension=c.extension, box=c.box, at=c.at)
                    for c in (ringing.calls if ringing is not None else ())],
        "last_event_id": resume,
        "popup_for": settings.popup_for,
        "staff": viewer.staff,
        "numbers": list(viewer.numbers),
        "client_url": settings.client_url,
        "language": language,
        "words": {k: v for k, v in words.items()
                  if k.startswith("popup_") or k == "withheld"},
    }


def day_start(now: float, zone: ZoneInfo) -> datetime:
    """The office's midnight of the day ``now`` (epoch seconds) falls in."""
    return datetime.fromtimestamp(now, zone).replace(hour=0, minute=0, second=0,
                                                     microsecond=0)


# --- the files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: bytes


def load_static() -> dict[str, StaticFile]:
    """dpvoip's page files, read once from the installed package (``setup.py`` ships
    them as package data)."""
    folder = resources.files("dpvoip.web") / "static"
    files = {}
    for name, kind in STATIC_TYPES.items():
        body = (folder / name).read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        files[name] = StaticFile(body, kind, etag)
    return files


# --- the edge ------------------------------------------------------------------------------


class LivePages:
    """``GET /voip/``, ``/voip/popup.json``, ``/voip/popup.js`` and ``/voip/static/*``."""

    def __init__(self, logins: LoginService, reads: LiveReads, settings: PageSettings,
                 language: str, zone: ZoneInfo, clock: Any, login_url: str,
                 settled: Callable[[], int | None] = lambda: None) -> None:
        """``settled``: the live feed's watermark (``LiveFeed.settled``)."""
        self._logins = logins
        self._settled = settled
        self._reads = reads
        self._settings = settings
        self._view = PageView(language, zone, settings.client_url, settings.recent_calls)
        self._clock = clock
        self._login_url = login_url
        self._files = load_static()

    async def page(self, request: IRequest) -> bytes:
        try:
            user = await self._logins.identify(request)
            viewer = await from_database(self._reads.viewer(user.id))
            settled = self._settled()  # before the snapshot: it shows every event to here
            snapshot = await from_database(self._reads.snapshot(
                day_start(self._clock.seconds(), self._view.zone),
                None if viewer.staff else viewer.user_id,
                self._settings.recent_calls, self._settings.open_tickets))
        except NotSignedIn as refused:
            target = request.uri.decode("latin-1")
            login = f"{self._login_url}?next={quote(target, safe='')}"
            return _send(request, 401, "text/html; charset=utf-8",
                         signed_out_page(self._view, login, refused.message))
        except DatabaseUnreachable:
            return _send(request, 503, "text/plain; charset=utf-8",
                         self._view.words["unavailable"].encode("utf-8"))
        return _send(request, 200, "text/html; charset=utf-8",
                     render_page(snapshot, self._view,
                                 page_resume_id(settled, *snapshot.window)))

    async def popup_json(self, request: IRequest) -> bytes:
        try:
            user = await self._logins.identify(request)
            viewer = await from_database(self._reads.viewer(user.id))
            settled = self._settled()  # before the read: see ``page``
            ringing = await from_database(self._reads.ringing(
                None if viewer.staff else viewer.user_id))
        except NotSignedIn as refused:
            return error_answer(request, HttpError(401, refused.message))
        except DatabaseUnreachable:
            return error_answer(request, HttpError(
                503, "the CRM database is not reachable; try again shortly"))
        body = json_body(popup_settings(viewer, self._settings, self._view.language,
                                        ringing, page_resume_id(settled, *ringing.window)))
        return _send(request, 200, "application/json; charset=utf-8", body)

    def static(self, request: IRequest, name: str) -> bytes:
        """One of dpvoip's files; revalidated by its ETag (a new version is seen within a
        few minutes of an upgrade)."""
        found = self._files.get(name)
        if found is None:
            raise HttpError(404, "no such resource")
        request.setHeader(b"ETag", found.etag)
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if found.etag in (request.getHeader(b"If-None-Match") or b"").split(b", "):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", found.content_type.encode())
        return found.body


def _send(request: IRequest, status: int, content_type: str, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type.encode())
    for name, value in PAGE_HEADERS.items():
        request.setHeader(name, value)
    return body
