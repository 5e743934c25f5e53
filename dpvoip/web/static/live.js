/* dpvoip's live page (/voip/): follows the event stream and changes the rows in place.
 *
 * The server rendered the page from the database; this script opens `events` (relative,
 * so the page works under any prefix the CRM's proxy gives /voip/) and applies each
 * event at once. Rows it builds have the shape of the server's rows. Every value goes in
 * as text (textContent), never as markup. Its settings are <body>'s data attributes. */
(function () {
  "use strict";
  var body = document.body;
  var words = JSON.parse(body.getAttribute("data-words") || "{}");
  var clientUrl = body.getAttribute("data-client-url") || "";
  var zone = body.getAttribute("data-zone") || "UTC";
  var recentLimit = parseInt(body.getAttribute("data-recent-limit"), 10) || 50;

  function parts(moment) {
    var out = {};
    new Intl.DateTimeFormat("en-GB", {
      timeZone: zone, hourCycle: "h23", day: "2-digit", month: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit"
    }).formatToParts(moment).forEach(function (p) { out[p.type] = p.value; });
    return out;
  }
  function clockTime(iso) {
    if (!iso) { return ""; }
    var p = parts(new Date(iso));
    return p.hour + ":" + p.minute + ":" + p.second;
  }
  function dayTime(moment) {
    var p = parts(moment);
    return p.day + "/" + p.month + " " + p.hour + ":" + p.minute;
  }
  function talkTime(seconds) {
    if (seconds === null || seconds === undefined) { return ""; }
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    var ss = (s < 10 ? "0" : "") + s;
    if (h) { return h + ":" + (m < 10 ? "0" : "") + m + ":" + ss; }
    return m + ":" + ss;
  }
  function word(key, fallback) {
    return Object.prototype.hasOwnProperty.call(words, key) ? words[key] : fallback;
  }

  function cell(className, text) {
    var td = document.createElement("td");
    td.className = className;
    td.textContent = text === null || text === undefined ? "" : String(text);
    return td;
  }
  function clientCell(client) {
    var td = cell("c-client", "");
    if (client && client.id !== null && client.id !== undefined) {
      var a = document.createElement("a");
      a.href = clientUrl.replace("{id}", encodeURIComponent(String(client.id)));
      a.textContent = client.name || "#" + client.id;
      td.appendChild(a);
    }
    return td;
  }
  function number(value) { return value ? value : word("withheld", ""); }

  function callRow(call) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-call", call.call_id);
    tr.className = "call state-" + call.state +
      (call.outcome ? " outcome-" + String(call.outcome).replace(/ /g, "-") : "");
    tr.appendChild(cell("c-time", clockTime(call.at)));
    tr.appendChild(cell("c-direction", word("direction_" + call.direction, call.direction)));
    tr.appendChild(cell("c-number", number(call.number)));
    tr.appendChild(clientCell(call.client));
    if (call.state === "ended") {
      tr.appendChild(cell("c-outcome", word("outcome:" + call.outcome, call.outcome || call.status)));
      tr.appendChild(cell("c-duration", talkTime(call.duration)));
    } else {
      tr.appendChild(cell("c-box", call.box || ""));
      tr.appendChild(cell("c-extension", call.extension || ""));
      tr.appendChild(cell("c-state", word("state_" + call.state, call.state)));
    }
    return tr;
  }

  function find(container, attribute, value) {
    var rows = container.children;
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute(attribute) === String(value)) { return rows[i]; }
    }
    return null;
  }
  function showEmpty(container) {
    var notes = document.querySelectorAll("p.empty");
    for (var i = 0; i < notes.length; i++) {
      if (notes[i].getAttribute("data-empty-for") === container.id) {
        notes[i].hidden = container.children.length > 0;
      }
    }
  }
  function put(container, attribute, value, row) {
    var old = find(container, attribute, value);
    if (old) { container.replaceChild(row, old); } else { container.insertBefore(row, container.firstChild); }
    showEmpty(container);
  }
  function drop(container, attribute, value) {
    var old = find(container, attribute, value);
    if (old) { container.removeChild(old); showEmpty(container); }
    return old;
  }

  var inProgress = document.getElementById("in-progress");
  var recent = document.getElementById("recent");
  var tickets = document.getElementById("tickets");
  var boxes = document.getElementById("boxes");

  function onCall(call) {
    // A row already shown keeps its first cell: when the call started (an event's "at"
    // is the time of its change).
    var shown = find(inProgress, "data-call", call.call_id);
    if (call.state === "ended") {
      drop(inProgress, "data-call", call.call_id);
      var row = callRow(call);
      if (shown) { row.firstChild.textContent = shown.firstChild.textContent; }
      put(recent, "data-call", call.call_id, row);
      while (recent.children.length > recentLimit) { recent.removeChild(recent.lastChild); }
      showEmpty(recent);
    } else {
      var fresh = callRow(call);
      if (shown) { fresh.firstChild.textContent = shown.firstChild.textContent; }
      put(inProgress, "data-call", call.call_id, fresh);
    }
  }
  function onTicket(ticket) {
    var old = find(tickets, "data-ticket", ticket.ticket_id);
    var tr = document.createElement("tr");
    tr.setAttribute("data-ticket", String(ticket.ticket_id));
    tr.className = "ticket";
    tr.appendChild(cell("t-opened", old ? old.firstChild.textContent : dayTime(new Date())));
    tr.appendChild(cell("t-number", number(ticket.number)));
    // a grouped call without a client does not take the ticket's client away
    var oldClient = old ? old.querySelector(".c-client") : null;
    tr.appendChild(!ticket.client && oldClient ? oldClient.cloneNode(true) : clientCell(ticket.client));
    tr.appendChild(cell("t-count", ticket.count));
    put(tickets, "data-ticket", ticket.ticket_id, tr);
  }
  function onBox(box) {
    var state = box.connected ? "connected" : "disconnected";
    var li = document.createElement("li");
    li.setAttribute("data-box", box.box);
    li.className = "box " + state;
    var name = document.createElement("span"); name.className = "b-name"; name.textContent = box.box;
    var st = document.createElement("span"); st.className = "b-state"; st.textContent = word("box_" + state, state);
    var since = document.createElement("span"); since.className = "b-since";
    since.textContent = box.since ? word("box_since", "{time}").replace("{time}", dayTime(new Date(box.since))) : "";
    li.appendChild(name); li.appendChild(document.createTextNode(" "));
    li.appendChild(st); li.appendChild(document.createTextNode(" "));
    li.appendChild(since);
    put(boxes, "data-box", box.box, li);
  }

  var streamState = document.getElementById("stream-state");
  function setState(key) {
    streamState.textContent = word(key, key);
    streamState.className = "stream-state " + key;
    body.setAttribute("data-stream", key);
  }
  function handle(apply) {
    return function (event) {
      var data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (data && typeof data === "object") { apply(data); }
    };
  }

  var delay = 1000;
  // The events after the ones this page was rendered with (those committed while it
  // loaded); the browser's own reconnects then send Last-Event-ID, which comes first.
  var resume = body.getAttribute("data-last-event-id");
  function connect() {
    var url = resume ? "events?last_event_id=" + encodeURIComponent(resume) : "events";
    var source = new EventSource(url);
    source.onopen = function () { delay = 1000; setState("live"); };
    source.onerror = function () {
      setState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        // Refused (dpvoip restarting, signed out): the browser gives up on its own. Come
        // back with a fresh snapshot once the page answers again.
        source.close();
        window.setTimeout(retry, delay);
        delay = Math.min(delay * 2, 60000);
      }
    };
    source.addEventListener("call", handle(onCall));
    source.addEventListener("ticket", handle(onTicket));
    source.addEventListener("box", handle(onBox));
    source.addEventListener("reload", function () { window.location.reload(); });
  }
  function retry() {
    fetch(window.location.href, { method: "HEAD", credentials: "same-origin", cache: "no-store" })
      .then(function (answer) {
        if (answer.ok) { window.location.reload(); return; }
        window.setTimeout(retry, delay);
        delay = Math.min(delay * 2, 60000);
      }, function () {
        window.setTimeout(retry, delay);
        delay = Math.min(delay * 2, 60000);
      });
  }
  setState("reconnecting");
  connect();
}());
