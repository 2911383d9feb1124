// The live part of the dashboard, served as /dashboard/app.js (no build step, nothing
// fetched from outside the page). It follows Orion's event stream, prepends each event
// to the events table, and after events redraws the workers and rentals tables from
// GET /api/workers, GET /api/rentals and GET /api/apps: the page never reloads.
//
// - Rows are built with DOM text nodes only, never innerHTML, so a hostile value (an
//   event message, a probe error) is shown, not run. They mirror the rows of
//   dashboard.html.j2: change both together.
// - Requests go to `location.origin + path`, not to a relative path: a page opened as
//   http://user:token@host/dashboard keeps those credentials in its base URL, and
//   fetch() refuses a URL with credentials. The browser adds the Basic credentials it
//   was asked for on /dashboard to these same-origin requests by itself.
// - The stream is read with fetch() rather than EventSource. Orion names each event
//   after its kind (`event: worker.dead`), and an EventSource delivers a named event
//   only to a listener registered for that exact name, so new kinds would be missed.
//   fetch() also sends Last-Event-ID on the first request (the newest event on the
//   page), so nothing that happened between the render and the stream is lost.
'use strict';

(() => {
  /** Rows kept in the events table. */
  const MAX_EVENTS = 50;
  /** Events arrive in bursts (a death, a move): one redraw per burst. */
  const REFRESH_DELAY_MS = 100;
  /** Probes that change nothing write no event; redraw now and then for their times. */
  const PERIODIC_REFRESH_MS = 10000;
  /** Waits before reconnecting the stream, growing while it keeps failing. */
  const RETRY_MS = [500, 1000, 2000, 5000];

  const api = (path) => window.location.origin + path;
  const byId = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Id of the newest event on the page; the stream resumes after it. */
  let lastEventId = Number(document.body.dataset.lastEventId) || 0;

  // ---- formatting, as the template's `clock` and `short` filters ----

  const clock = (iso) => (iso ? iso.replace('T', ' ').slice(0, 19) : '—');
  const short = (id) => id.slice(0, 8);
  const orDash = (v) => (v === null || v === undefined || v === '' ? '—' : String(v));

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === 'class') node.className = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  const badge = (status) => el('span', { class: 'badge status-' + status }, status);

  function workerRow(w) {
    const status = el('td', {}, badge(w.status));
    if (w.quarantine_reason) status.append(' ', badge('quarantined'));
    if (w.retired) status.append(' ', badge('retired'));
    let rental = '—';
    if (w.rental) {
      rental = `${w.rental.username} (${w.rental.tenant})`;
      if (!w.rental.serving) rental += ' — awaiting cleanup';
    }
    return el(
      'tr',
      { id: 'worker-' + w.name, 'data-status': w.status, 'data-rental': w.rental ? w.rental.id : '' },
      el('td', {}, w.name),
      status,
      el('td', {}, w.drained ? 'yes' : '—'),
      el('td', {}, rental),
      el('td', {}, clock(w.last_checked)),
      el('td', { class: 'num' }, orDash(w.probe_latency_ms)),
      el('td', { class: 'error' }, w.last_probe_error || w.quarantine_reason || ''),
    );
  }

  function rentalRow(r) {
    return el(
      'tr',
      { id: 'rental-' + r.id, 'data-status': r.status, 'data-worker': r.worker || '' },
      el('td', { title: r.id }, short(r.id)),
      el('td', {}, r.username),
      el('td', {}, r.tenant),
      el('td', {}, orDash(r.worker)),
      el('td', {}, badge(r.status)),
      el('td', {}, r.host ? `${r.host}:${r.port}` : '—'),
      el('td', {}, r.endpoint ? `${r.endpoint.host}:${r.endpoint.port}` : '—'),
      el('td', {}, r.last_snapshot_at ? clock(r.last_snapshot_at) : '—'),
      el('td', {}, clock(r.created_at)),
    );
  }

  function appRow(a) {
    const instances = a.instances.map((i) =>
      el('span', { class: 'badge status-' + i.status, title: `instance ${i.id}, ${i.restarts} restart(s)` },
        `${i.worker}: ${i.status}`));
    return el(
      'tr',
      { id: `app-${a.tenant}-${a.name}`, 'data-ready': String(a.ready), 'data-replicas': String(a.replicas) },
      el('td', {}, a.name),
      el('td', {}, a.tenant),
      el('td', {}, a.image),
      el('td', { class: 'num' }, `${a.ready}/${a.replicas}`),
      el('td', {}, ...(instances.length ? instances : ['—'])),
    );
  }

  function eventRow(e) {
    return el(
      'tr',
      { id: 'event-' + e.id, 'data-kind': e.kind },
      el('td', { class: 'num' }, String(e.id)),
      el('td', {}, clock(e.at)),
      el('td', {}, el('span', { class: 'kind kind-' + e.kind.replaceAll('.', '-') }, e.kind)),
      el('td', {}, orDash(e.worker)),
      el('td', { title: e.rental_id || '' }, e.rental_id ? short(e.rental_id) : '—'),
      el('td', {}, e.message),
    );
  }

  function replaceRows(table, rows, emptyText) {
    const body = byId(table).tBodies[0];
    const columns = byId(table).tHead.rows[0].cells.length;
    if (rows.length === 0) {
      rows = [el('tr', { class: 'empty' }, el('td', { colspan: String(columns) }, emptyText))];
    }
    body.replaceChildren(...rows);
  }

  // ---- the workers and rentals tables ----

  async function getJson(path) {
    const resp = await fetch(api(path), {
      credentials: 'same-origin',
      cache: 'no-store',
      headers: { Accept: 'application/json' },
    });
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  async function refresh() {
    const updated = byId('updated');
    try {
      const [workers, rentals, apps] = await Promise.all([
        getJson('/api/workers'), getJson('/api/rentals'), getJson('/api/apps'),
      ]);
      replaceRows('workers', workers.workers.map(workerRow), 'no workers in the inventory');
      replaceRows('rentals', rentals.rentals.map(rentalRow), 'no rentals');
      replaceRows('apps', apps.apps.map(appRow), 'no apps');
      updated.textContent = `updated ${clock(new Date().toISOString())} UTC`;
      updated.classList.remove('error');
    } catch (err) {
      updated.textContent = `update failed (${err.message}); retrying`;
      updated.classList.add('error');
    }
  }

  // At most one redraw in flight, and one more queued behind it.
  let refreshTimer = null;
  let refreshing = false;
  let refreshAgain = false;

  function scheduleRefresh() {
    if (refreshTimer === null) refreshTimer = setTimeout(runRefresh, REFRESH_DELAY_MS);
  }

  async function runRefresh() {
    refreshTimer = null;
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    try {
      await refresh();
    } finally {
      refreshing = false;
      if (refreshAgain) {
        refreshAgain = false;
        scheduleRefresh();
      }
    }
  }

  // ---- the event stream ----

  function setConnection(state, text) {
    const indicator = byId('connection');
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  function addEvent(e) {
    if (e.id <= lastEventId) return; // already on the page
    lastEventId = e.id;
    const body = byId('events').tBodies[0];
    body.querySelector('tr.empty')?.remove();
    body.prepend(eventRow(e));
    while (body.rows.length > MAX_EVENTS) body.lastElementChild.remove();
    scheduleRefresh();
  }

  /** Reads Server-Sent Events (Orion ends lines with \n) and calls `onEvent` with each record's JSON. */
  async function readEvents(stream, onEvent) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const record = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = record
          .split('\n')
          .filter((line) => line.startsWith('data:'))
          .map((line) => line.slice(5).replace(/^ /, ''))
          .join('\n');
        // Keep-alive comments carry no data.
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  async function follow() {
    let failures = 0;
    for (;;) {
      try {
        const resp = await fetch(api('/api/events/stream'), {
          credentials: 'same-origin',
          cache: 'no-store',
          headers: { Accept: 'text/event-stream', 'Last-Event-ID': String(lastEventId) },
        });
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        setConnection('live', 'live');
        failures = 0;
        scheduleRefresh(); // whatever changed while the stream was down
        await readEvents(resp.body, addEvent);
        // The server ended the stream (a restart): reconnect.
      } catch (err) {
        console.warn('event stream:', err);
        failures += 1;
      }
      setConnection('reconnecting', 'reconnecting…');
      await sleep(RETRY_MS[Math.min(failures, RETRY_MS.length - 1)]);
    }
  }

  setInterval(scheduleRefresh, PERIODIC_REFRESH_MS);
  follow();
})();
