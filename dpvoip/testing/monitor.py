"""A fake of the CRM's ``fritz_monitor.py``: it reads a CallMonitor script (the format of
``dpvoip fritz-sim``, ``dpvoip.testing.fritzbox.parse_script``) and sends what the script
would send for each line, in either contract:

- ``rest`` (v3.5): ``POST voip-calls/`` on RING/CALL, ``PATCH voip-calls/<id>/`` with
  ``{"status": "completed"}`` on CONNECT and ``{"status": "missed"|"completed",
  "create_ticket": bool, "ended_at"}`` on DISCONNECT, ``X-API-Key``, times ISO 8601 in UTC;
- ``webhook`` (v4): ``POST fritz-webhook/`` with ``{"action": "create", ...}`` and
  ``{"action": "update", "id", "status", "ended_at"}``, ``Authorization: Bearer``, times
  naive in the office's zone (as a script on the office's clock writes them).

The monitor's times are the lines' own (``{now}`` is ``start`` plus the delays so far):
deterministic, and never waited for. Each exchange is kept for the test to read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import treq

from dpvoip.fritzbox.parser import Call, Connect, Disconnect, Ring, parse
from dpvoip.testing.fritzbox import Send, expand, parse_script


@dataclass
class Exchange:
    method: str
    path: str
    sent: dict[str, Any]
    status: int
    answer: Any


@dataclass
class _Open:
    id: int | None
    direction: str
    answered: bool = False


@dataclass
class FakeMonitor:
    base: str  # http://127.0.0.1:PORT
    token: str
    contract: str = "rest"  # or "webhook"
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("Europe/Athens"))
    prefix: str = "/accounting/api/"  # or "/accounting/api/v1/" (rest only)
    pool: Any = None
    exchanges: list[Exchange] = field(default_factory=list)
    calls: dict[int, _Open] = field(default_factory=dict)

    async def play(self, script: str, start: float) -> list[Exchange]:
        """Send what the monitor would for each line of ``script``, its clock at ``start``
        (POSIX seconds) when the script begins."""
        at = start
        for step in parse_script(script).steps:
            at += step.delay
            if isinstance(step.action, Send):
                line = expand(step.action.text.encode(), at, self.zone).decode()
                await self.line(line)
        return self.exchanges

    async def line(self, text: str) -> None:
        event = parse(text)
        when = event.at.replace(tzinfo=self.zone)
        if isinstance(event, Ring | Call):
            direction = "incoming" if isinstance(event, Ring) else "outgoing"
            remote = event.caller if isinstance(event, Ring) else event.called
            body: dict[str, Any] = {
                "call_id": f"{event.conn_id}_{int(when.timestamp())}",
                "phone_number": remote, "direction": direction,
                "started_at": self._time(when)}
            if self.contract == "rest":
                body["status"] = "active"
                exchange = await self.send("POST", "voip-calls/", body)
            else:
                exchange = await self.send("POST", "fritz-webhook/",
                                           {"action": "create", **body})
            answer = exchange.answer if isinstance(exchange.answer, dict) else {}
            self.calls[event.conn_id] = _Open(answer.get("id"), direction)
            return
        call = self.calls.get(event.conn_id)
        if call is None or call.id is None:
            return  # as the script: a call it could not create is forgotten
        if isinstance(event, Connect):
            call.answered = True
            if self.contract == "rest":
                await self.send("PATCH", f"voip-calls/{call.id}/", {"status": "completed"})
            return
        assert isinstance(event, Disconnect)
        del self.calls[event.conn_id]
        status = "completed" if call.answered else "missed"
        if self.contract == "rest":
            await self.send("PATCH", f"voip-calls/{call.id}/", {
                "status": status, "create_ticket": not call.answered,
                "ended_at": self._time(when)})
        else:
            await self.send("POST", "fritz-webhook/", {
                "action": "update", "id": call.id, "status": status,
                "ended_at": self._time(when)})

    def _time(self, when: datetime) -> str:
        if self.contract == "rest":
            return when.astimezone(UTC).isoformat()
        return when.replace(tzinfo=None).isoformat()

    def headers(self) -> dict[Any, Any]:
        auth = ({"X-API-Key": [self.token]} if self.contract == "rest"
                else {"Authorization": [f"Bearer {self.token}"]})
        return {"Content-Type": ["application/json"], **auth}

    async def send(self, method: str, path: str, body: Any,
                   headers: dict[Any, Any] | None = None,
                   raw: bytes | None = None) -> Exchange:
        url = self.base + self.prefix + path
        data = raw if raw is not None else json.dumps(body).encode()
        response = await treq.request(method, url, data=data,
                                      headers=self.headers() if headers is None else headers,
                                      pool=self.pool)
        content = await response.content()
        try:
            answer: Any = json.loads(content)
        except ValueError:
            answer = content
        exchange = Exchange(method, path, body, response.code, answer)
        self.exchanges.append(exchange)
        return exchange
