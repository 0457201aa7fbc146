"""The live hpcbatch page in the Dask dashboard: ``<dashboard>/hpcbatch``.

A :class:`DashboardPlugin` (a ``SchedulerPlugin``) runs inside the scheduler, wherever
that is (a LocalCluster in this process, a dask-jobqueue SLURMCluster, a scheduler started
by hand, the driver job), and adds two routes to the scheduler's own dashboard server:

- ``/hpcbatch``: a self-contained page (inline HTML + JS, no CDN) that polls
- ``/hpcbatch/state.json`` every second: per worker, memory now (process, managed,
  spilled) against the plan's predicted peak, the memory limit and Dask's thresholds,
  paused and restarted workers; the run's chunks (done, in flight, retried, split,
  quarantined, failed), rate and ETA; each kill and split; the plan and its reasons;
  GPU memory where a worker reports it.

Worker memory is the scheduler's own (``WorkerState.memory``, ``memory_limit``,
``status``); the plan and the run's progress come from the driver: :func:`install`
registers the plugin and sends the plan, and the :class:`DashboardFeed` it returns is a
progress watcher of the runner (:attr:`hpcbatch.runner.RunOptions.watchers`) that sends
each snapshot with ``client.log_event`` at most once a second, which reaches the
plugin's ``log_event`` hook.

The routes are on the dashboard's HTTP server, so they are bound to the dashboard's
address (127.0.0.1 by default) and reached through the same SSH tunnel. A route cannot
be removed from a running server: the plugin is registered once per scheduler
(idempotent) and each run resets its state with a ``run`` event.

Nothing here may fail a run: :func:`install` and the feed log a warning and step aside.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from typing import Any
from urllib.parse import urlparse, urlunparse

from distributed.diagnostics.plugin import SchedulerPlugin

log = logging.getLogger(__name__)

PLUGIN_NAME = "hpcbatch-dashboard"
TOPIC = "hpcbatch-dashboard"
ROUTE = "hpcbatch"  # the page; the state is ROUTE/state.json
FEED_EVERY_S = 1.0  # the driver sends a progress snapshot at most this often
EVENTS_KEPT = 500  # run events (kills, splits, ...) the page lists
DEATHS_KEPT = 200
THRESHOLD_NAMES = ("target", "spill", "pause", "terminate")

__all__ = ["DashboardFeed", "DashboardPlugin", "install", "page_url"]


def page_url(dashboard_link: str) -> str:
    """The hpcbatch page next to a dashboard link (``http://h:8787/status`` ->
    ``http://h:8787/hpcbatch``)."""
    parts = urlparse(dashboard_link)
    path = parts.path.rstrip("/")
    if path.endswith("/status"):
        path = path[: -len("/status")]
    return urlunparse(parts._replace(path=f"{path}/{ROUTE}", query="", fragment=""))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (what ``log_event`` can carry: msgpack-able)."""
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------ in the scheduler ----


class DashboardPlugin(SchedulerPlugin):
    """Serves ``/hpcbatch`` from the scheduler; see the module doc.

    ``plan`` (``Plan.to_dict()``) and ``thresholds`` (``{"target": 0.6, ...}``) seed the
    page; each run's ``run`` event replaces them.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, plan: dict | None = None, thresholds: dict | None = None):
        self.plan = plan
        self.thresholds = dict(thresholds or {})
        self.scheduler = None
        self._reset(None)

    def _reset(self, run: dict | None) -> None:
        self.run = run
        self.progress: dict | None = None
        self.progress_at: float | None = None
        self.progress_lag: float | None = None  # driver -> scheduler, seconds
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.n_messages = 0
        self.first_message: float | None = None
        if not hasattr(self, "deaths"):
            self.deaths: deque[dict] = deque(maxlen=DEATHS_KEPT)
            self.names: dict[str, str] = {}
            self.starts: dict[str, int] = {}

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        for address, ws in scheduler.workers.items():
            self._added(address, ws)
        _add_routes(scheduler)
        _add_navbar_link(scheduler)

    # -- hooks ---------------------------------------------------------------

    def add_worker(self, scheduler=None, worker: str = "", **kwargs) -> None:
        ws = (scheduler or self.scheduler).workers.get(worker)
        if ws is not None:
            self._added(worker, ws)

    def _added(self, address: str, ws) -> None:
        name = str(ws.name)
        self.names[address] = name
        self.starts[name] = self.starts.get(name, 0) + 1

    def remove_worker(self, scheduler=None, worker: str = "", *, stimulus_id="", **kw) -> None:
        name = self.names.get(worker, worker)
        self.deaths.append(
            {"time": time.time(), "worker": name, "address": worker,
             "why": re.sub(r"-[0-9.]+$", "", str(stimulus_id))}  # fmt: skip
        )

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        now = time.time()
        if msg.get("kind") == "run":
            self._reset(msg)
            self.plan = msg.get("plan") or self.plan
            self.thresholds = dict(msg.get("thresholds") or self.thresholds)
        elif msg.get("kind") == "progress":
            snap = msg.get("snapshot") or {}
            self.progress, self.progress_at = snap, now
            self.progress_lag = max(0.0, now - float(msg.get("sent") or now))
            self._merge(snap.get("events") or ())
        else:
            return
        self.n_messages += 1
        self.first_message = self.first_message or now

    def _merge(self, events) -> None:
        """Add the snapshot's recent events (the runner's last few) not seen yet."""
        key = lambda e: json.dumps(e, sort_keys=True, default=str)  # noqa: E731
        seen = {key(e) for e in self.events}
        for event in events:
            if isinstance(event, dict) and key(event) not in seen:
                seen.add(key(event))
                self.events.append(event)

    # -- the page's state ----------------------------------------------------

    def state(self) -> dict:
        """What ``state.json`` serves (plain JSON types)."""
        now = time.time()
        since = now - self.first_message if self.first_message else 0.0
        return {
            "now": now,
            "run": {k: v for k, v in (self.run or {}).items() if k in ("run_id", "started")} or None,
            "plan": self.plan,
            "thresholds": self.thresholds,
            "progress": self.progress,
            "progress_age_s": round(now - self.progress_at, 3) if self.progress_at else None,
            "progress_lag_s": self.progress_lag,
            "events": [self._named(e) for e in self.events],
            "workers": sorted(
                (self._worker(a, ws) for a, ws in self._workers().items()),
                key=lambda w: (len(w["name"]), w["name"], w["address"]),
            ),
            "deaths": list(self.deaths),
            "messages": {"n": self.n_messages, "per_s": self.n_messages / since if since else 0},
        }

    def _named(self, event: dict) -> dict:
        worker = event.get("worker")
        if isinstance(worker, str) and worker in self.names:
            return {**event, "worker_name": self.names[worker]}
        return event

    def _workers(self) -> dict:
        return dict(self.scheduler.workers) if self.scheduler is not None else {}

    def _worker(self, address: str, ws) -> dict:
        mem = ws.memory
        gpu = (ws.metrics or {}).get("gpu") or {}
        name = str(ws.name)
        return {
            "name": name,
            "address": address,
            "status": getattr(ws.status, "name", str(ws.status)),
            "nthreads": ws.nthreads,
            "memory_limit": ws.memory_limit or 0,
            "process": mem.process,
            "managed": mem.managed,
            "unmanaged": mem.unmanaged,
            "spilled": mem.spilled,
            "executing": len(ws.processing),
            "restarts": max(0, self.starts.get(name, 1) - 1),
            "gpu_used": gpu.get("memory-used"),
            "gpu_total": ((getattr(ws, "extra", None) or {}).get("gpu") or {}).get("memory-total"),
            "thresholds": self.thresholds.get("per_worker", {}).get(name),
        }


def _plugin_of(scheduler) -> DashboardPlugin | None:
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    return plugin if isinstance(plugin, DashboardPlugin) else None


def _add_routes(scheduler) -> None:
    """``/hpcbatch`` and ``/hpcbatch/state.json`` on the scheduler's dashboard server,
    once per scheduler (a tornado route cannot be removed)."""
    app = getattr(scheduler, "http_application", None)
    if app is None or getattr(scheduler, "_hpcbatch_routes", False):
        return
    from tornado import web

    class Page(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.write(PAGE_HTML)

    class State(web.RequestHandler):
        def get(self) -> None:
            plugin = _plugin_of(scheduler)
            body = plugin.state() if plugin is not None else {"plan": None, "workers": []}
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.write(json.dumps(body, default=str))

    base = _http_prefix(app) + ROUTE
    app.add_handlers(r".*", [(rf"{base}/?", Page), (rf"{base}/state\.json", State)])
    scheduler._hpcbatch_routes = True
    log.info("hpcbatch page added to the dashboard: %s", base)


def _http_prefix(app) -> str:
    """The dashboard's URL prefix (``--dashboard-prefix``; ``/`` by default), read from
    Dask's own ``health`` route (the scheduler keeps no attribute for it)."""
    try:
        for host in app.default_router.rules:
            for rule in getattr(host.target, "rules", ()):
                pattern = rule.matcher.regex.pattern
                if pattern.endswith("/health$"):
                    return pattern[: -len("health$")]
    except AttributeError:  # tornado's router changed: the default prefix
        pass
    return "/"


def _add_navbar_link(scheduler) -> None:
    """``hpcbatch`` in the navbar of Dask's pages loaded from now on (an internal list of
    ``distributed.dashboard.scheduler``: skipped, with a debug line, where it changed)."""
    try:
        from distributed.dashboard.scheduler import template_variables

        pages = template_variables(scheduler)["pages"]
        if ROUTE not in pages:
            pages.append(ROUTE)
    except Exception as exc:  # noqa: BLE001 (no bokeh, or the internal list moved)
        log.debug("no navbar link for the hpcbatch page: %s", exc)


# ---------------------------------------------------------- on the driver ----


class DashboardFeed:
    """A runner progress watcher: sends the snapshot to the plugin with
    ``client.log_event`` at most every ``every_s`` seconds (and the final one), with only
    the events not sent before (the scheduler keeps each topic's last 1000 messages:
    distributed.admin.low-level-log-length). A failure logs one warning and turns the
    feed off; the run goes on."""

    def __init__(self, client, every_s: float = FEED_EVERY_S):
        self.client = client
        self.every_s = every_s
        self.last = -float("inf")
        self.sent = 0
        self.seconds = 0.0  # time spent in log_event (round trips to the scheduler)
        self.off = False
        self.events_sent: set[str] = set()

    def __call__(self, snapshot: dict) -> None:
        now = time.monotonic()
        if self.off or (not snapshot.get("final") and now - self.last < self.every_s):
            return
        self.last = now
        snap = jsonable(snapshot)
        events = snap.get("events") or []
        keyed = [(json.dumps(e, sort_keys=True), e) for e in events]
        snap["events"] = [e for k, e in keyed if k not in self.events_sent]
        self.events_sent = {k for k, _ in keyed}  # the runner sends its last few every time
        msg = {"kind": "progress", "sent": time.time(), "snapshot": snap}
        try:
            self.client.log_event(TOPIC, msg)
        except Exception as exc:  # noqa: BLE001 (the page must never fail the run)
            self.off = True
            log.warning("hpcbatch page: progress not sent, the page stops updating (%s)", exc)
            return
        self.sent += 1
        self.seconds += time.monotonic() - now


def worker_thresholds(client) -> dict:
    """Dask's memory thresholds as the workers have them: ``{"per_worker": {name:
    {target, spill, pause, terminate}}}`` plus the common values when they agree."""

    def read(dask_worker=None) -> dict:
        import dask.config

        got = {k: dask.config.get(f"distributed.worker.memory.{k}") for k in THRESHOLD_NAMES}
        return {"name": str(getattr(dask_worker, "name", "")), "thresholds": got}

    found = client.run(read, on_error="return")
    per = {
        v["name"]: v["thresholds"] for v in found.values() if isinstance(v, dict) and "name" in v
    }
    common = {json.dumps(t, sort_keys=True) for t in per.values()}
    out: dict = {"per_worker": per}
    if len(common) == 1:
        out.update(next(iter(per.values())))
    return out


def install(client, plan=None, run_id: str | None = None) -> tuple[DashboardFeed, ...]:
    """Register the plugin on ``client``'s scheduler (once), send it the plan, and return
    the feed as the runner's ``watchers``; ``()`` (with a warning) where that fails."""
    try:
        plan_dict = jsonable(plan.to_dict()) if hasattr(plan, "to_dict") else plan
        thresholds = dict(getattr(plan, "thresholds", None) or {})
        try:
            thresholds.update(worker_thresholds(client))
        except Exception as exc:  # noqa: BLE001 (the plan's thresholds then)
            log.debug("worker thresholds not read: %s", exc)
        thresholds = jsonable(thresholds)
        client.register_plugin(DashboardPlugin(plan_dict, thresholds), name=PLUGIN_NAME)
        client.log_event(
            TOPIC,
            {"kind": "run", "run_id": run_id, "started": time.time(), "plan": plan_dict,
             "thresholds": thresholds},
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 (the page must never fail the run)
        log.warning("hpcbatch page not available in the dashboard: %s", exc)
        return ()
    link = getattr(client, "dashboard_link", None)
    if link:
        log.info("hpcbatch page: %s", page_url(link))
    return (DashboardFeed(client),)


PAGE_HTML = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hpcbatch: live run</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
header a{color:#9cd0ff;margin-right:10px}
header h1{font-size:18px;margin:0}
main{padding:8px 16px;max-width:1300px}
section{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px 12px;margin:10px 0}
h2{font-size:15px;margin:2px 0 8px}
table{border-collapse:collapse}
td,th{padding:3px 8px;text-align:left;vertical-align:middle;border-bottom:1px solid #eee}
th{font-weight:600;color:#555}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.counters{display:flex;gap:10px;flex-wrap:wrap}
.counter{border:1px solid #ddd;border-radius:4px;padding:4px 10px;min-width:78px}
.counter b{display:block;font-size:20px;font-variant-numeric:tabular-nums}
.counter.bad b{color:#b00020}
.bar{height:14px;background:#e6e6e6;border-radius:3px;overflow:hidden;width:100%;max-width:900px}
.bar div{height:100%;background:#2e7d32}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;margin-left:4px;background:#e0e0e0}
.badge.paused{background:#ffe082}.badge.restarted{background:#ffab91}.badge.closing{background:#ef9a9a}
.ev-kill td{color:#b00020}.ev-split td{color:#6a1b9a}
.muted{color:#777}.small{font-size:12px}
.legend span{margin-right:12px}.sw{display:inline-block;width:10px;height:10px;margin-right:3px;vertical-align:middle}
ul{margin:4px 0;padding-left:20px}
#err{color:#b00020}
</style></head>
<body>
<header><h1>hpcbatch</h1><span id="title" class="muted">waiting for a run...</span>
<span><a href="status">Dask status</a><a href="workers">Workers</a><a href="info/main/workers.html">Info</a></span>
<span id="updated" class="small"></span><span id="err"></span></header>
<main>
<section id="chunks"><h2>Chunks</h2>
<div class="bar" title="items done"><div id="itembar" style="width:0"></div></div>
<p id="items" class="small">no progress received yet</p>
<div class="counters" id="counters"></div></section>
<section><h2>Worker memory</h2>
<div class="legend small"><span><i class="sw" style="background:#1565c0"></i>managed</span>
<span><i class="sw" style="background:#90caf9"></i>unmanaged (process - managed)</span>
<span><i class="sw" style="background:#9e9e9e"></i>spilled to disk</span>
<span><i class="sw" style="background:#ef6c00"></i>plan's predicted peak</span>
<span><i class="sw" style="background:#000"></i>memory limit</span>
<span class="muted">T/S/P/K: Dask's target, spill, pause, terminate thresholds</span></div>
<table id="workers"><thead><tr><th>worker</th><th>state</th><th>memory now vs predicted peak vs limit</th>
<th class="num">process</th><th class="num">managed</th><th class="num">spilled</th><th class="num">limit</th>
<th>last 2 min</th><th class="num">tasks</th><th>GPU memory</th></tr></thead><tbody></tbody></table></section>
<section><h2>Out-of-memory events and other run events</h2>
<table id="events"><thead><tr><th>time</th><th>event</th><th>chunk</th><th>worker</th><th>became / why</th></tr></thead>
<tbody></tbody></table><p id="noevents" class="small muted">none yet</p></section>
<section><h2>Worker deaths and restarts (scheduler)</h2>
<table id="deaths"><thead><tr><th>time</th><th>worker</th><th>address</th><th>scheduler stimulus</th></tr></thead><tbody></tbody></table>
<p id="nodeaths" class="small muted">none</p></section>
<section id="plan"><h2>Plan</h2><table id="plantable"><tbody></tbody></table>
<h2 style="margin-top:10px">Why</h2><ul id="reasons"></ul></section>
</main>
<script>
"use strict";
var STATE_URL = location.pathname.replace(/\/+$/, "") + "/state.json";
var hist = {}, HIST_S = 120, lastOk = 0;
window.hpcbatchState = null; window.hpcbatchPolls = 0;
function fmt(b){ if(b===null||b===undefined||isNaN(b)) return "-";
  var u=["B","KiB","MiB","GiB","TiB"], i=0; b=Number(b);
  while(Math.abs(b)>=1024&&i<u.length-1){b/=1024;i++;}
  return (i?b.toFixed(b<10?2:1):b.toFixed(0)).replace(/\.0+$/,"")+" "+u[i]; }
function dur(s){ if(s===null||s===undefined) return "?"; s=Math.round(s);
  var h=Math.floor(s/3600), m=Math.floor(s%3600/60), x=s%60;
  return (h?h+"h":"")+(h||m?String(m).padStart(h?2:1,"0")+"m":"")+String(x).padStart(h||m?2:1,"0")+"s"; }
function clock(t){ return t ? new Date(t*1000).toLocaleTimeString() : ""; }
function el(tag, attrs, text){ var e=document.createElement(tag);
  for(var k in (attrs||{})) e.setAttribute(k, attrs[k]); if(text!==undefined) e.textContent=text; return e; }
function svg(tag, attrs){ var e=document.createElementNS("http://www.w3.org/2000/svg", tag);
  for(var k in attrs) e.setAttribute(k, attrs[k]); return e; }
function row(tbody, cells, cls){ var tr=el("tr", cls?{"class":cls}:{});
  cells.forEach(function(c){ var td=el("td"); if(c instanceof Node) td.appendChild(c); else td.textContent=(c===null||c===undefined)?"":String(c); tr.appendChild(td); });
  tbody.appendChild(tr); return tr; }
function clear(node){ while(node.firstChild) node.removeChild(node.firstChild); }

function memBar(w, peak, th){
  var W=420, H=30, lim=w.memory_limit||0;
  var top=Math.max(lim, w.process+w.spilled, peak||0, 1)*1.04, x=function(b){return Math.min(W, W*b/top);};
  var s=svg("svg",{width:W,height:H,"class":"membar"});
  s.appendChild(svg("rect",{x:0,y:10,width:W,height:14,fill:"#f1f1f1"}));
  var managed=Math.min(w.managed,w.process);
  s.appendChild(svg("rect",{x:0,y:10,width:x(managed),height:14,fill:"#1565c0"}));
  s.appendChild(svg("rect",{x:x(managed),y:10,width:Math.max(0,x(w.process)-x(managed)),height:14,fill:"#90caf9"}));
  if(w.spilled>0) s.appendChild(svg("rect",{x:x(w.process),y:13,width:Math.max(1,x(w.process+w.spilled)-x(w.process)),height:8,fill:"#9e9e9e"}));
  if(lim){ var names={target:"T",spill:"S",pause:"P",terminate:"K"};
    Object.keys(names).forEach(function(k){ var f=th&&th[k]; if(typeof f!=="number"||!f) return;
      var xx=x(f*lim); s.appendChild(svg("line",{x1:xx,x2:xx,y1:1,y2:28,stroke:"#555","stroke-dasharray":"2,2"}));
      var t=svg("text",{x:xx+2,y:8,"font-size":9,fill:"#555"}); t.textContent=names[k]; s.appendChild(t); });
    s.appendChild(svg("line",{x1:x(lim)-1,x2:x(lim)-1,y1:1,y2:29,stroke:"#000","stroke-width":2})); }
  if(peak) s.appendChild(svg("line",{x1:x(peak),x2:x(peak),y1:6,y2:28,stroke:"#ef6c00","stroke-width":2}));
  var title=svg("title",{}); title.textContent="process "+fmt(w.process)+", managed "+fmt(w.managed)+", spilled "+fmt(w.spilled)+
    ", predicted peak "+fmt(peak)+", limit "+fmt(lim); s.appendChild(title);
  return s; }

function spark(name, lim){
  var h=hist[name]||[], W=160, H=26, s=svg("svg",{width:W,height:H});
  if(h.length<2) return s; var t1=h[h.length-1][0], top=Math.max(lim||0, Math.max.apply(null,h.map(function(p){return p[1];})),1);
  var pts=h.map(function(p){ return (W-(t1-p[0])*W/HIST_S).toFixed(1)+","+(H-1-(H-2)*p[1]/top).toFixed(1); }).join(" ");
  s.appendChild(svg("polyline",{points:pts,fill:"none",stroke:"#1565c0","stroke-width":1.5})); return s; }

function workerThresholds(st, w){ return w.thresholds || st.thresholds || {}; }

function renderWorkers(st){
  var tb=document.querySelector("#workers tbody"); clear(tb);
  var peak=st.plan?st.plan.predicted_peak_bytes:null;
  st.workers.forEach(function(w){
    var h=hist[w.name]=hist[w.name]||[]; h.push([st.now, w.process]);
    while(h.length&&st.now-h[0][0]>HIST_S) h.shift();
    var state=el("span",{}); state.appendChild(el("span",{"class":"badge "+w.status},w.status));
    if(w.restarts) state.appendChild(el("span",{"class":"badge restarted"},"restarted "+w.restarts+"x"));
    var gpu=(w.gpu_used!==null&&w.gpu_used!==undefined)?fmt(w.gpu_used)+(w.gpu_total?" / "+fmt(w.gpu_total):""):"-";
    var tr=row(tb,[w.name, state, memBar(w, peak, workerThresholds(st,w)), fmt(w.process), fmt(w.managed), fmt(w.spilled),
      fmt(w.memory_limit), spark(w.name, w.memory_limit), w.executing, gpu], "worker");
    tr.setAttribute("data-name", w.name); tr.setAttribute("data-process", w.process); tr.setAttribute("data-status", w.status);
    tr.title=w.address; [3,4,5,6,8].forEach(function(i){ tr.children[i].className="num"; });
  });
  if(!st.workers.length) row(tb,["no workers connected"]); }

var COUNTERS=[["done","done"],["in_flight","in flight"],["retried","retried"],["split","split"],
  ["quarantined","quarantined"],["failed","failed"],["requeued","requeued"],["skipped","resumed"]];
function renderProgress(st){
  var p=st.progress, run=st.run||{}, box=document.getElementById("counters");
  var title=document.getElementById("title");
  if(!p){ title.textContent = run.run_id ? "run "+run.run_id+" starting" : "waiting for a run..."; return; }
  title.textContent="run "+p.run_id+": "+p.state+(p.final?" (final)":"")+(p.message?" - "+p.message:"");
  var c=p.counters||{}; clear(box);
  COUNTERS.forEach(function(k){ var d=el("div",{"class":"counter"+((k[0]==="failed"&&c[k[0]])?" bad":""),id:"c-"+k[0]});
    d.appendChild(el("b",{},c[k[0]]===undefined?"-":c[k[0]])); d.appendChild(document.createTextNode(k[1])); box.appendChild(d); });
  var pct=p.n_items?100*p.items_done/p.n_items:0;
  document.getElementById("itembar").style.width=pct.toFixed(1)+"%";
  document.getElementById("items").textContent=p.items_done+" / "+p.n_items+" "+(p.item_name||"item")+"s ("+pct.toFixed(0)+"%), "+
    (c.done||0)+" / "+p.n_chunks+" chunks, "+Number(p.rate||0).toFixed(1)+" "+(p.item_name||"item")+"s/s, ETA "+
    (p.final?"-":dur(p.eta_s))+", elapsed "+dur(p.elapsed_s)+(p.report_dir?", report: "+p.report_dir:""); }

function renderEvents(st){
  var tb=document.querySelector("#events tbody"); clear(tb);
  st.events.slice().reverse().forEach(function(e){
    var became = e.kind==="split" ? "split into "+(e.children||[]).join(", ")+(e.reason?" ("+e.reason+")":"")
      : [e.reason, e.rss_bytes?"RSS "+fmt(e.rss_bytes):"", e.item!==undefined?"item "+e.item:""].filter(Boolean).join(", ");
    var who = e.worker_name!==undefined ? "worker "+e.worker_name+" ("+e.worker+")" : e.worker;
    row(tb,[clock(e.time), e.kind, e.chunk, who, became], "ev-"+e.kind); });
  document.getElementById("noevents").style.display=st.events.length?"none":"";
  var db=document.querySelector("#deaths tbody"); clear(db);
  st.deaths.slice().reverse().forEach(function(d){ row(db,[clock(d.time), d.worker, d.address, d.why]); });
  document.getElementById("nodeaths").style.display=st.deaths.length?"none":""; }

var PLAN_KEYS=[["workload","workload"],["n_workers","workers"],["threads_per_worker","threads per worker"],
  ["memory_limit_bytes","memory limit per worker",fmt],["predicted_peak_bytes","predicted peak per worker",fmt],
  ["chunk_size","items per chunk"],["n_chunks","chunks"],["n_items","items"],["memory_fraction","memory fraction"],
  ["binding","binding"],["footprint_source","footprint from"],["gpu_batch_size","GPU batch size"]];
var planShown=null;
function renderPlan(st){
  var key=JSON.stringify([st.plan, st.thresholds]); if(key===planShown) return; planShown=key;
  var tb=document.querySelector("#plantable tbody"), ul=document.getElementById("reasons"), p=st.plan; clear(tb); clear(ul);
  if(!p){ row(tb,["no plan received (an existing cluster used without hpcbatch?)"]); return; }
  PLAN_KEYS.forEach(function(k){ if(p[k[0]]===null||p[k[0]]===undefined) return; row(tb,[k[1], k[2]?k[2](p[k[0]]):p[k[0]]]); });
  var th=st.thresholds||{}; row(tb,["Dask thresholds", ["target","spill","pause","terminate"].map(function(k){ return k+" "+th[k]; }).join(", ")]);
  (p.reasons||[]).forEach(function(r){ ul.appendChild(el("li",{},r)); }); }

function render(st){
  window.hpcbatchState=st; renderProgress(st); renderWorkers(st); renderEvents(st); renderPlan(st);
  var age=st.progress_age_s, m=st.messages||{};
  document.getElementById("updated").textContent="updated "+clock(st.now)+
    (age!==null&&age!==undefined?" | last progress "+age.toFixed(1)+" s ago":"")+" | "+(m.n||0)+" messages from the driver";
}
function poll(){
  fetch(STATE_URL,{cache:"no-store"}).then(function(r){ if(!r.ok) throw new Error("HTTP "+r.status); return r.json(); })
    .then(function(st){ window.hpcbatchPolls++; lastOk=Date.now(); document.getElementById("err").textContent=""; render(st); })
    .catch(function(e){ document.getElementById("err").textContent="scheduler not answering ("+e.message+"): the run may have ended"; })
    .then(function(){ setTimeout(poll, 1000); }); }
poll();
</script></body></html>
"""
