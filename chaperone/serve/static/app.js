// chaperone dashboard: the run list and one run's output, live.
// Everything from the server is put in the page as text (textContent, text
// nodes): never as HTML.  Output is bytes: decoded as UTF-8 by a streaming
// TextDecoder per stream (invalid sequences become U+FFFD), control
// characters made visible, very long lines and very long outputs capped.
"use strict";
(function () {
  const FINAL = new Set(["done", "error", "lost", "failed"]);
  const LINE_CAP = 4000;          // characters of one line shown
  const PANE_CAP = 2000000;       // characters kept in one pane
  const CSRF = {"X-Chaperone-CSRF": "1"};

  const $ = (sel) => document.querySelector(sel);
  const runs = new Map();         // id -> run view
  const rows = new Map();         // id -> <tr>
  let lastEventId = null;
  let events = null;
  let skew = 0;                   // server clock - this clock, seconds
  let retry = 500;
  let current = null;             // the run view being shown: {id, followers}

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function setConn(state, text) {
    const c = $("#conn");
    c.dataset.state = state;
    c.textContent = text;
    $("#signin").hidden = state !== "signed-out";
  }

  // Formatting -------------------------------------------------------------------------

  function fmtBytes(n) {
    if (n < 1000) return n + " B";
    const units = ["kB", "MB", "GB", "TB"];
    let v = n, i = -1;
    do { v /= 1000; i++; } while (v >= 1000 && i < units.length - 1);
    return v.toFixed(v < 10 ? 1 : 0) + " " + units[i];
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + "s";
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
    const pad = (x) => String(x).padStart(2, "0");
    return h ? h + "h" + pad(m) + "m" + pad(sec) + "s" : m + "m" + pad(sec) + "s";
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const pad = (x) => String(x).padStart(2, "0");
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function duration(v) {
    if (!FINAL.has(v.state) && v.start_time) {
      const start = Date.parse(v.start_time) / 1000;
      if (!isNaN(start)) return Math.max(0, Date.now() / 1000 + skew - start);
    }
    return v.duration;
  }

  function ending(v) {
    if (v.state === "done") {
      if (v.signal) return (v.timed_out ? "timeout " : "") + v.signal + " (" + v.exit_code + ")";
      return "exit " + v.return_code;
    }
    if (v.state === "error") return "not started (" + v.exit_code + ")";
    if (v.state === "lost" || v.state === "failed") return v.state + " (" + v.exit_code + ")";
    return v.pid ? "pid " + v.pid : "";
  }

  function stateCell(td, v) {
    td.textContent = "";
    const s = el("span", v.state, "state " + v.state + (v.state === "done" && v.exit_code ? " failed-exit" : ""));
    td.appendChild(s);
    if (v.silent) {
      const b = el("span", "silent", "badge silent");
      b.title = "not heard from since " + (v.last_seen ? fmtTime(v.last_seen) : "this server started");
      td.appendChild(b);
    }
  }

  // The run list ------------------------------------------------------------------------

  function filters() {
    const p = routeParams();
    return {host: p.get("host") || "", state: p.get("state") || ""};
  }

  function matches(v, f) {
    if (f.host && v.host !== f.host) return false;
    if (f.state === "active") return v.state === "running" || v.state === "starting";
    if (f.state === "silent") return !!v.silent;
    if (f.state && v.state !== f.state) return false;
    return true;
  }

  function makeRow(v) {
    const tr = document.createElement("tr");
    tr.dataset.id = v.id;
    for (const cls of ["id", "host", "cmd", "st", "end", "start", "dur", "bytes"]) tr.appendChild(el("td", "", cls));
    const a = el("a", v.id);
    a.href = "#/run/" + encodeURIComponent(v.id);
    tr.cells[0].appendChild(a);
    return tr;
  }

  function fillRow(tr, v) {
    tr.cells[1].textContent = v.host;
    tr.cells[2].textContent = v.command;
    tr.cells[2].title = v.command;
    stateCell(tr.cells[3], v);
    tr.cells[4].textContent = ending(v);
    tr.cells[5].textContent = fmtTime(v.start_time || v.created);
    tr.cells[6].textContent = fmtDuration(duration(v));
    tr.cells[7].textContent = fmtBytes(v.stdout_bytes) + " / " + fmtBytes(v.stderr_bytes);
    tr.dataset.state = v.state;
    tr.dataset.silent = v.silent ? "1" : "0";
  }

  function newer(a, b) {   // sort: newest first
    return a.created > b.created || (a.created === b.created && a.id > b.id);
  }

  function upsert(v) {
    const known = runs.get(v.id);
    runs.set(v.id, v);
    let tr = rows.get(v.id);
    if (!tr) {
      tr = makeRow(v);
      rows.set(v.id, tr);
      const body = $("#runs tbody");
      let before = null;
      for (const other of body.rows) {
        const ov = runs.get(other.dataset.id);
        if (ov && newer(v, ov)) { before = other; break; }
      }
      body.insertBefore(tr, before);
    }
    fillRow(tr, v);
    tr.hidden = !matches(v, filters());
    if (!known || known.host !== v.host) hostOptions();
    if (current && current.id === v.id) showMeta(v);
  }

  function remove(id) {
    runs.delete(id);
    const tr = rows.get(id);
    if (tr) tr.remove();
    rows.delete(id);
    if (current && current.id === id) showMeta(null);
  }

  function renderAll(list) {
    const body = $("#runs tbody");
    body.textContent = "";
    runs.clear();
    rows.clear();
    list.sort((a, b) => (newer(a, b) ? -1 : 1));
    const frag = document.createDocumentFragment();
    const f = filters();
    for (const v of list) {
      runs.set(v.id, v);
      const tr = makeRow(v);
      fillRow(tr, v);
      tr.hidden = !matches(v, f);
      rows.set(v.id, tr);
      frag.appendChild(tr);
    }
    body.appendChild(frag);
    hostOptions();
    if (current) showMeta(runs.get(current.id) || null);
    counts();
  }

  function hostOptions() {
    const sel = $("#f-host");
    const want = filters().host;
    const hosts = new Set([...runs.values()].map((v) => v.host));
    if (want) hosts.add(want);
    const have = [...sel.options].slice(1).map((o) => o.value);
    const sorted = [...hosts].sort();
    if (have.join("\n") !== sorted.join("\n")) {
      while (sel.options.length > 1) sel.remove(1);
      for (const h of sorted) { const o = el("option", h); o.value = h; sel.appendChild(o); }
    }
    sel.value = want;
  }

  function applyFilters() {
    const f = filters();
    $("#f-host").value = f.host;
    $("#f-state").value = f.state;
    for (const [id, tr] of rows) tr.hidden = !matches(runs.get(id), f);
    counts();
  }

  function counts() {
    let shown = 0;
    for (const tr of rows.values()) if (!tr.hidden) shown++;
    $("#count").textContent = shown + " of " + rows.size + " runs";
    $("#empty").hidden = shown > 0;
  }

  function tick() {   // running durations
    for (const [id, tr] of rows) {
      const v = runs.get(id);
      if (v && !FINAL.has(v.state) && !tr.hidden) tr.cells[6].textContent = fmtDuration(duration(v));
    }
    if (current) {
      const v = runs.get(current.id);
      const dd = document.querySelector('#rv-meta dd[data-key="duration"]');
      if (v && dd) dd.textContent = fmtDuration(duration(v));
    }
  }

  // Live events --------------------------------------------------------------------------

  function connect() {
    if (events) events.close();
    const url = "/api/events" + (lastEventId !== null ? "?since=" + encodeURIComponent(lastEventId) : "");
    const es = events = new EventSource(url);
    es.addEventListener("open", () => { retry = 500; setConn("live", "live"); });
    es.addEventListener("snapshot", (e) => {
      lastEventId = e.lastEventId;
      const d = JSON.parse(e.data);
      skew = Date.parse(d.server_time) / 1000 - Date.now() / 1000;
      renderAll(d.runs);
    });
    es.addEventListener("run", (e) => {
      lastEventId = e.lastEventId;
      upsert(JSON.parse(e.data).run);
      counts();
    });
    es.addEventListener("removed", (e) => {
      lastEventId = e.lastEventId;
      remove(JSON.parse(e.data).id);
      counts();
    });
    es.onerror = () => {
      es.close();
      if (events !== es) return;
      events = null;
      setConn("reconnecting", "reconnecting…");
      fetch("/api/server", {credentials: "same-origin"}).then((r) => {
        if (r.status === 401) { setConn("signed-out", "not signed in"); setTimeout(connect, 5000); }
        else setTimeout(connect, retry);
      }, () => setTimeout(connect, retry));
      retry = Math.min(retry * 2, 5000);
    };
  }

  // One run ----------------------------------------------------------------------------

  const CTRL = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff]/g;
  function visible(text) {
    return text.replace(CTRL, (c) => {
      const n = c.charCodeAt(0);
      if (n < 0x20) return String.fromCharCode(0x2400 + n);   // ␀ ... ␟
      if (n === 0x7f) return "\u2421";                        // ␡
      return "<U+" + n.toString(16).toUpperCase().padStart(4, "0") + ">";
    });
  }

  function b64bytes(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  class Follower {
    constructor(id, pane) {
      this.id = id;
      this.pane = pane;
      this.stream = pane.dataset.stream;
      this.pre = pane.querySelector("pre");
      this.note = pane.querySelector(".pane-note");
      this.info = pane.querySelector(".pane-info");
      this.pre.textContent = "";
      this.note.textContent = "";
      this.offset = 0;
      this.decoder = new TextDecoder("utf-8", {ignoreBOM: true});  // (a BOM is output too: shown)
      this.cr = false;          // a "\r" held back: is it the first half of "\r\n"?
      this.lineLen = 0;
      this.shown = 0;
      this.cutLines = 0;
      this.dropped = false;
      this.ended = false;
      this.closed = false;
      this.es = null;
      this.retry = 500;
      pane.querySelector(".raw").href = "/api/runs/" + encodeURIComponent(id) + "/output?stream=" + this.stream;
      pane.dataset.ended = "0";
      this.showInfo();
      this.connect();
    }

    connect() {
      if (this.closed || this.ended) return;
      const url = "/api/runs/" + encodeURIComponent(this.id) + "/output?stream=" + this.stream + "&offset=" + this.offset;
      const es = this.es = new EventSource(url);
      es.addEventListener("open", () => { this.retry = 500; });
      es.addEventListener("output", (e) => {
        const d = JSON.parse(e.data);
        let bytes = b64bytes(d.data);
        if (d.offset > this.offset) { es.close(); this.reconnect(); return; }   // (a gap: ask again)
        if (d.offset < this.offset) bytes = bytes.subarray(this.offset - d.offset);
        this.offset += bytes.length;
        this.add(this.decoder.decode(bytes, {stream: true}));
        this.showInfo();
      });
      es.addEventListener("end", (e) => {
        es.close();
        // (the end comes with the run as it ended: the page shows that state
        // now, whichever of this stream and the events stream is first)
        try { const d = JSON.parse(e.data); if (d.run && d.run.id) upsert(d.run); } catch (err) { /* no run */ }
        this.ended = true;
        this.add(this.decoder.decode(), true);
        this.pane.dataset.ended = "1";
        this.showInfo();
      });
      es.addEventListener("removed", () => { es.close(); this.ended = true; this.note.textContent = "run removed"; });
      es.onerror = () => { es.close(); if (this.es === es) this.reconnect(); };
    }

    reconnect() {
      if (this.closed || this.ended) return;
      setTimeout(() => this.connect(), this.retry);
      this.retry = Math.min(this.retry * 2, 5000);
    }

    close() {
      this.closed = true;
      if (this.es) this.es.close();
    }

    showInfo() {
      this.info.textContent = fmtBytes(this.offset) + (this.ended ? ", complete" : "");
      this.pane.dataset.offset = String(this.offset);
    }

    add(text, last) {
      if (this.cr) { text = "\r" + text; this.cr = false; }
      if (!last && text.endsWith("\r")) { this.cr = true; text = text.slice(0, -1); }
      text = text.replace(/\r\n/g, "\n");
      let out = "";
      let i = 0;
      while (i < text.length) {
        const nl = text.indexOf("\n", i);
        const end = nl === -1 ? text.length : nl;
        const room = LINE_CAP - this.lineLen;
        if (room > 0) {
          out += visible(text.slice(i, i + Math.min(room, end - i)));
          if (end - i > room) {
            out += " \u2026 [line longer than " + LINE_CAP + " characters: the rest is in the raw bytes]";
            this.cutLines++;
          }
        }
        this.lineLen += end - i;
        if (nl === -1) break;
        out += "\n";
        this.lineLen = 0;
        i = nl + 1;
      }
      if (!out) return;
      const pre = this.pre;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.appendChild(document.createTextNode(out));
      this.shown += out.length;
      while (this.shown > PANE_CAP && pre.firstChild && pre.firstChild !== pre.lastChild) {
        this.shown -= pre.firstChild.data.length;
        pre.removeChild(pre.firstChild);
        this.dropped = true;
      }
      const notes = [];
      if (this.dropped) notes.push("earlier output not shown");
      if (this.cutLines) notes.push(this.cutLines + " long line" + (this.cutLines > 1 ? "s" : "") + " cut");
      this.note.textContent = notes.length ? "(" + notes.join("; ") + ": see the raw bytes)" : "";
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  }

  function showMeta(v) {
    const dl = $("#rv-meta");
    dl.textContent = "";
    if (!v) {
      $("#rv-title").textContent = current ? current.id + " (no such run)" : "";
      $("#kill-box").hidden = true;
      return;
    }
    $("#rv-title").textContent = v.id;
    const rows = [
      ["state", v.state + (v.silent ? " (host silent)" : "")], ["ended", FINAL.has(v.state) ? ending(v) : ""],
      ["host", v.host], ["command", v.command], ["argv", JSON.stringify(v.argv)], ["pid", v.pid],
      ["created", fmtTime(v.created)], ["started", fmtTime(v.start_time)], ["ended at", fmtTime(v.end_time)],
      ["duration", fmtDuration(duration(v))], ["last heard", v.last_seen ? fmtTime(v.last_seen) : "—"],
      ["output", fmtBytes(v.stdout_bytes) + " / " + fmtBytes(v.stderr_bytes)], ["error", v.error],
    ];
    for (const [k, val] of rows) {
      if (val === null || val === undefined || val === "") continue;
      dl.appendChild(el("dt", k));
      const dd = el("dd", val);
      dd.dataset.key = k;
      dl.appendChild(dd);
    }
    $("#kill-box").hidden = FINAL.has(v.state);
  }

  function openRun(id) {
    if (current && current.id === id) return;
    closeRun();
    $("#list-view").hidden = true;
    $("#run-view").hidden = false;
    $("#kill-msg").textContent = "";
    current = {id: id, followers: []};
    showMeta(runs.get(id) || null);
    if (!runs.has(id)) {
      fetch("/api/runs/" + encodeURIComponent(id), {credentials: "same-origin"})
        .then((r) => (r.ok ? r.json() : null)).then((v) => { if (v && current && current.id === id) showMeta(v); }, () => {});
    }
    for (const pane of document.querySelectorAll(".pane")) current.followers.push(new Follower(id, pane));
  }

  function closeRun() {
    if (current) for (const f of current.followers) f.close();
    current = null;
  }

  async function kill() {
    if (!current) return;
    const id = current.id;
    const sig = $("#kill-signal").value;
    const graceText = $("#kill-grace").value.trim();
    const body = {signal: sig};
    let what = "Send SIG" + sig + " to run " + id;
    if (graceText !== "") {
      body.grace = Number(graceText);
      what += ", then SIGKILL after " + graceText + " s if it is still running";
    }
    if (!window.confirm(what + "?")) return;
    const msg = $("#kill-msg");
    msg.textContent = "sending…";
    try {
      const r = await fetch("/api/runs/" + encodeURIComponent(id) + "/signal", {
        method: "POST", credentials: "same-origin",
        headers: Object.assign({"Content-Type": "application/json"}, CSRF), body: JSON.stringify(body)});
      const d = await r.json();
      msg.textContent = r.ok ? "sent SIG" + sig : "refused: " + d.error;
    } catch (e) {
      msg.textContent = "could not reach the server";
    }
  }

  // Routes: #/?host=H&state=S (the list) and #/run/ID (one run) ----------------------------

  function routeParams() {
    const h = location.hash.replace(/^#/, "");
    const q = h.indexOf("?");
    return new URLSearchParams(q === -1 ? "" : h.slice(q + 1));
  }

  function route() {
    const h = location.hash.replace(/^#/, "");
    const m = /^\/run\/([^?]+)/.exec(h);
    if (m) {
      openRun(decodeURIComponent(m[1]));
    } else {
      closeRun();
      $("#run-view").hidden = true;
      $("#list-view").hidden = false;
      applyFilters();
    }
  }

  function setFilter() {
    const p = new URLSearchParams();
    if ($("#f-host").value) p.set("host", $("#f-host").value);
    if ($("#f-state").value) p.set("state", $("#f-state").value);
    const q = p.toString();
    location.hash = "#/" + (q ? "?" + q : "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#f-host").addEventListener("change", setFilter);
    $("#f-state").addEventListener("change", setFilter);
    $("#kill").addEventListener("click", kill);
    window.addEventListener("hashchange", route);
    route();
    connect();
    setInterval(tick, 1000);
  });
})();
