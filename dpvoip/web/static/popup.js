/* dpvoip's screen pop for the CRM: <script src="/voip/popup.js" defer></script> in the
 * CRM's base template.
 *
 * It asks dpvoip who is signed in (popup.json, with the CRM's session cookie: same origin
 * behind the CRM's proxy), listens to the event stream and shows a small box when a call
 * rings for this user (or for everyone: [page] popup_for), with the caller's name and a
 * link to the client; a desktop notification too when the user has allowed them.
 *
 * It must never break the CRM's page: everything is inside try/catch, nothing is shown
 * while dpvoip is away, and it comes back with a growing pause (2 s up to 5 min). One tab
 * of the browser holds the stream (Web Locks) and passes the calls to the others
 * (BroadcastChannel), so that many open tabs do not use up the browser's connections. */
(function () {
  "use strict";
  var script = document.currentScript;
  function quietly(work) {
    return function () {
      try { return work.apply(this, arguments); } catch (e) { return undefined; }
    };
  }
  quietly(function () {
    if (!script || !script.src || !window.EventSource || !window.fetch || !window.JSON) { return; }
    var base = new URL(".", script.src).href;  // .../voip/
    var settings = null;
    var settingsAt = 0;
    var shown = {};
    var pause = 2000;
    var channel = null;
    try { channel = new BroadcastChannel("dpvoip-popup"); } catch (e) { channel = null; }

    function later(work) {
      var wait = pause * (0.75 + Math.random() / 2);
      pause = Math.min(pause * 2, 300000);
      window.setTimeout(quietly(work), wait);
    }
    function word(key) { return (settings.words && settings.words[key]) || key; }
    function digits(text) { return String(text || "").replace(/[^0-9]/g, ""); }
    function mine(extension) {
      var ext = digits(extension);
      if (!ext) { return true; }  // not known yet (a Fritz!Box line rings every phone)
      return (settings.numbers || []).some(function (n) {
        var d = digits(n);
        return d !== "" && (d === ext || (d.length >= 9 && ext.length >= 9 && d.slice(-9) === ext.slice(-9)));
      });
    }
    function wanted(call) {
      if (call.state !== "ringing" || call.direction !== "incoming") { return false; }
      return settings.popup_for === "everyone" || !settings.staff || mine(call.extension);
    }
    function clientLink(call) {
      if (!call.client || call.client.id === null || call.client.id === undefined) { return ""; }
      return new URL(settings.client_url.replace("{id}", encodeURIComponent(String(call.client.id))),
                     window.location.href).href;
    }
    function holder() {
      var box = document.getElementById("dpvoip-popups");
      if (!box) {
        box = document.createElement("div");
        box.id = "dpvoip-popups";
        var s = box.style;
        s.position = "fixed"; s.right = "16px"; s.bottom = "16px"; s.zIndex = "2147483000";
        s.display = "flex"; s.flexDirection = "column"; s.gap = "8px"; s.maxWidth = "320px";
        document.body.appendChild(box);
      }
      return box;
    }
    function line(text, bold) {
      var div = document.createElement("div");
      div.textContent = text;
      if (bold) { div.style.fontWeight = "600"; }
      return div;
    }
    function show(call) {
      var popup = shown[call.call_id];
      var fresh = !popup;
      if (fresh) {
        popup = document.createElement("div");
        popup.className = "dpvoip-popup";
        popup.setAttribute("role", "status");
        popup.setAttribute("data-dpvoip-call", call.call_id);
        var s = popup.style;
        s.background = "#fff"; s.color = "#1d1d1f"; s.border = "1px solid #c9c9c9";
        s.borderLeft = "4px solid #f9ab00"; s.borderRadius = "6px"; s.padding = "10px 12px";
        s.boxShadow = "0 2px 10px rgba(0,0,0,.2)"; s.font = "14px system-ui, sans-serif";
        shown[call.call_id] = popup;
        holder().appendChild(popup);
      }
      while (popup.firstChild) { popup.removeChild(popup.firstChild); }
      var close = document.createElement("button");
      close.type = "button"; close.textContent = "×"; close.title = word("popup_close");
      close.setAttribute("aria-label", word("popup_close"));
      close.style.cssFloat = "right"; close.style.border = "0"; close.style.background = "none";
      close.style.cursor = "pointer"; close.style.fontSize = "16px";
      close.addEventListener("click", quietly(function () { forget(call.call_id); }));
      popup.appendChild(close);
      popup.appendChild(line(word("popup_ringing"), false));
      var name = call.client && call.client.name ? call.client.name : word("popup_unknown");
      popup.appendChild(line(name, true));
      popup.appendChild(line(call.number || word("withheld"), false));
      var link = clientLink(call);
      if (link) {
        var a = document.createElement("a");
        a.href = link; a.textContent = word("popup_open_client"); a.className = "dpvoip-client";
        popup.appendChild(a);
      }
      if (window.Notification && Notification.permission === "default") {
        var ask = document.createElement("button");
        ask.type = "button"; ask.textContent = word("popup_enable");
        ask.style.display = "block"; ask.style.marginTop = "6px"; ask.style.fontSize = "12px";
        ask.addEventListener("click", quietly(function () { Notification.requestPermission(); }));
        popup.appendChild(ask);
      }
      return fresh;
    }
    function desktop(call) {
      if (!window.Notification || Notification.permission !== "granted") { return; }
      var name = call.client && call.client.name ? call.client.name : word("popup_unknown");
      var note = new Notification(word("popup_ringing") + ": " + name,
                                  { body: call.number || word("withheld"), tag: "dpvoip-" + call.call_id });
      var link = clientLink(call);
      note.onclick = quietly(function () { window.focus(); if (link) { window.location.href = link; } });
    }
    function forget(callId) {
      var popup = shown[callId];
      if (popup && popup.parentNode) { popup.parentNode.removeChild(popup); }
      delete shown[callId];
    }
    function onCall(call, leader) {
      if (!call || typeof call !== "object" || !call.call_id) { return; }
      if (wanted(call)) {
        if (show(call) && leader) { desktop(call); }
      } else if (shown[call.call_id] && call.state !== "ringing") {
        forget(call.call_id);  // answered or over: no longer ringing
      }
    }

    function openStream() {
      // The first stream after popup.json resumes after the read that listed the calls
      // ringing (nothing committed in between is missed); later ones, or one opened long
      // after (another tab held the stream), take the live events only.
      var resume = settings.last_event_id;
      settings.last_event_id = null;
      var fresh = resume !== null && resume !== undefined && Date.now() - settingsAt < 10000;
      var source = new EventSource(base + "events" +
                                   (fresh ? "?last_event_id=" + encodeURIComponent(String(resume)) : ""));
      source.addEventListener("open", quietly(function () { pause = 2000; }));
      source.addEventListener("call", quietly(function (event) {
        var call = JSON.parse(event.data);
        onCall(call, true);
        if (channel) { channel.postMessage(call); }
      }));
      source.addEventListener("error", quietly(function () {
        // dpvoip away, restarting or refusing: stop the browser's own quick retries and
        // come back later, more slowly each time.
        source.close();
        later(openStream);
      }));
    }
    function listen() {
      if (channel) { channel.onmessage = quietly(function (event) { onCall(event.data, false); }); }
      if (navigator.locks && navigator.locks.request) {
        navigator.locks.request("dpvoip-popup-stream", function () {
          return new Promise(function () { quietly(openStream)(); });  // held while the tab lives
        }).catch(function () { return undefined; });
      } else {
        openStream();
      }
    }
    function start() {
      fetch(base + "popup.json", { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (answer) {
          if (answer.status === 401 || answer.status === 403 || answer.status === 404) { return null; }
          if (!answer.ok) { later(start); return null; }
          return answer.json().then(function (found) {
            settings = found;
            settingsAt = Date.now();
            pause = 2000;
            // Calls ringing as the page opened: shown here (the desktop notification
            // was the stream holder's when they began), only when the stream can say
            // how they go on (an id to resume after), or they could stay shown for ever.
            if (settings.last_event_id !== null && settings.last_event_id !== undefined) {
              (settings.ringing || []).forEach(function (call) { onCall(call, false); });
            }
            listen();
          });
        })
        .catch(function () { later(start); });
    }
    start();
  })();
}());
