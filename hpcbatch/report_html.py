"""``report.html``: one run on one self-contained page, readable offline.

Written next to ``report.json`` by the runner (:func:`write_html_report`).  Everything
is inline (CSS and SVG drawn here in Python, no script, no font, no image from
elsewhere), so the file opens on a compute node or a laptop without a network.  It shows:

- the run's summary, its plan and the planner's reasons;
- predicted vs measured peak per worker (bars, with the limit when it is in range);
- the memory timeline: per-worker RSS, one colour per worker (the colours, y range and
  reference lines of ``memory.png``: :func:`hpcbatch.report.memory_plot_data`), ticks
  for chunk starts, retries, splits and worker deaths;
- the chunk timeline: a Gantt chart, one lane per worker (a row per concurrent task),
  from the scheduler's task stream;
- worker deaths with their reasons, failed chunks, quarantined items;
- provenance (versions, host, SLURM job, command line, start/end, run id).

Chunks come from the scheduler's task stream records (``client.get_task_stream``):
their key ``(group, chunk_id, attempt)``, worker, ``compute`` start/stop and status.
A task whose worker died has no record (the death is drawn instead).
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import (
    MemoryPlotData,
    _worker_color,
    address_owners,
    memory_plot_data,
    summary_text,
)
from .units import format_bytes

log = logging.getLogger(__name__)

_MIB = 1024**2
#: at most this many points per worker series (min and max of each time bucket)
_MAX_POINTS = 2400
#: at most this many bars in the Gantt chart (beyond: neighbours within a pixel merge)
_MAX_BARS = 6000
_W, _LEFT, _RIGHT = 1100, 120, 190  # SVG width and margins (px)
#: a task that starts this much before the previous one on its row ended still follows
#: it (the worker's timestamps of one thread overlap by a few ms)
_OVERLAP_S = 0.05
#: more chunk starts than this: one start tick per pixel (else one per pixel and worker)
_MAX_START_TICKS = 3000
_DASH = {"-": "", ":": "2,3", "--": "6,4", "-.": "8,3,2,3"}
_TICK_COLORS = {"retry": "#000000", "split": "#9467bd", "death": "#d62728"}
_TICK_SHAPES = {"retry": "l8,0l-4,8z", "split": "l4,-4l4,4l-4,4z"}


@dataclass(frozen=True)
class ChunkBar:
    """One task of the run: a chunk (or a piece of a split one), one attempt."""

    chunk_id: str
    attempt: str  # the runner's attempt label: "0", "1" (a retry), "0.1" (rerun as is)
    worker: str  # address
    start: float  # seconds since the run started
    stop: float
    ok: bool

    @property
    def is_retry(self) -> bool:
        return self.attempt.split(".", 1)[0] not in ("", "0")


@dataclass(frozen=True)
class Tick:
    kind: str  # start | retry | split | death
    x: float  # seconds since the run started
    label: str
    worker: str = ""  # the worker's key (start ticks: its colour)


# ------------------------------------------------------------- the data ----


def chunk_bars(task_stream: Sequence[dict], t0: float, group: str | None = None) -> list[ChunkBar]:
    """The run's tasks from task stream records (only keys ``(group, chunk, attempt)``;
    ``group`` None: any ``hpcbatch-*`` group), in start order."""
    bars = []
    for rec in task_stream:
        key = rec.get("key")
        if not isinstance(key, (tuple, list)) or len(key) != 3:
            continue
        if (group is not None and key[0] != group) or not str(key[0]).startswith("hpcbatch-"):
            continue
        compute = [s for s in rec.get("startstops", ()) if s.get("action") == "compute"]
        if not compute:
            continue
        bars.append(
            ChunkBar(
                chunk_id=str(key[1]),
                attempt=str(key[2]),
                worker=str(rec.get("worker", "?")),
                start=min(s["start"] for s in compute) - t0,
                stop=max(s["stop"] for s in compute) - t0,
                ok=rec.get("status", "OK") == "OK",
            )
        )
    return sorted(bars, key=lambda b: (b.start, b.chunk_id))


def timeline_ticks(
    bars: Sequence[ChunkBar], deaths: Sequence[dict], t0: float, owner: dict[str, str]
) -> list[Tick]:
    """Ticks for chunk starts, retries, splits (the first start of a split chunk's
    pieces) and worker deaths, in time order."""
    ticks = [Tick("start", b.start, f"{b.chunk_id} started", owner.get(b.worker, b.worker))
             for b in bars]  # fmt: skip
    ticks += [
        Tick("retry", b.start, f"{b.chunk_id}: attempt {b.attempt} (retry)",
             owner.get(b.worker, b.worker))
        for b in bars if b.is_retry
    ]  # fmt: skip
    first_piece: dict[str, ChunkBar] = {}
    for b in bars:
        if "." in b.chunk_id:
            parent = b.chunk_id.rsplit(".", 1)[0]
            if parent not in first_piece or b.start < first_piece[parent].start:
                first_piece[parent] = b
    ticks += [
        Tick("split", b.start, f"{parent} split into {parent}.0 + {parent}.1")
        for parent, b in first_piece.items()
    ]
    for d in deaths:
        if d.get("time") is None:
            continue
        tasks = ", ".join(d.get("tasks") or ()) or "no chunk"
        who = owner.get(d.get("worker", ""), d.get("worker", "?"))
        ticks.append(Tick("death", d["time"] - t0, f"{who} died ({d.get('reason')}): {tasks}", who))
    return sorted(ticks, key=lambda t: t.x)


# -------------------------------------------------------------- drawing ----


@dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    px0: float
    px1: float

    def __call__(self, v: float) -> float:
        span = (self.hi - self.lo) or 1.0
        return self.px0 + (v - self.lo) / span * (self.px1 - self.px0)


def nice_ticks(hi: float, n: int = 6, lo: float = 0.0) -> list[float]:
    """Round axis ticks from ``lo`` (<= 0) to ``hi``, through 0."""
    if hi - lo <= 0 or not math.isfinite(hi - lo):
        return [0.0]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = -math.floor(-lo / step + 1e-9) if lo < 0 else 0
    return [i * step for i in range(first, int(hi / step + 1e-9) + 1)]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _downsample(xs: Sequence[float], ys: Sequence[float], n: int) -> list[tuple[float, float]]:
    """At most ~``n`` points: each time bucket's min and max (NaN breaks the line:
    kept as NaN)."""
    if len(xs) <= n:
        return list(zip(xs, ys, strict=True))
    lo, hi = xs[0], xs[-1]
    width = (hi - lo) / (n // 2) or 1.0
    out: list[tuple[float, float]] = []
    bucket: list[tuple[float, float]] = []
    current = None
    for x, y in zip(xs, ys, strict=True):
        b = int((x - lo) / width)
        if b != current and bucket:
            out += _extremes(bucket)
            bucket = []
        current = b
        bucket.append((x, y))
    return out + _extremes(bucket)


def _extremes(bucket: list[tuple[float, float]]) -> list[tuple[float, float]]:
    finite = [p for p in bucket if p[1] == p[1]]
    if len(finite) < len(bucket) and not finite:
        return [bucket[0]]  # all NaN: a gap
    if len(finite) <= 2:
        return finite + ([(bucket[-1][0], math.nan)] if len(finite) < len(bucket) else [])
    a, b = min(finite, key=lambda p: p[1]), max(finite, key=lambda p: p[1])
    pair = sorted({a, b})
    return pair + ([(bucket[-1][0], math.nan)] if len(finite) < len(bucket) else [])


def _path(points: list[tuple[float, float]], sx: _Scale, sy: _Scale) -> str:
    parts, pen = [], "M"
    for x, y in points:
        if y != y:
            pen = "M"
            continue
        parts.append(f"{pen}{sx(x):.1f},{sy(y):.1f}")
        pen = "L"
    return "".join(parts)


def _x_axis(sx: _Scale, y_px: float, top_px: float, label: str) -> list[str]:
    out = [f'<line class="axis" x1="{sx.px0}" y1="{y_px}" x2="{sx.px1}" y2="{y_px}"/>']
    for v in nice_ticks(sx.hi, lo=sx.lo):
        x = sx(v)
        if x < sx.px0 - 0.5 or x > sx.px1 + 0.5:
            continue
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top_px}" x2="{x:.1f}" y2="{y_px}"/>')
        out.append(f'<text x="{x:.1f}" y="{y_px + 14}" text-anchor="middle">{v:g}</text>')
    out.append(
        f'<text x="{(sx.px0 + sx.px1) / 2:.0f}" y="{y_px + 30}" text-anchor="middle">'
        f"{_e(label)}</text>"
    )
    return out


def memory_svg(data: MemoryPlotData, ticks: Sequence[Tick], x_hi: float, x_lo: float = 0.0) -> str:
    """The memory timeline as an SVG element (id ``memory``): one ``path.series`` per
    worker, the reference lines in range (labelled), kills, and a tick strip."""
    height, top, bottom = 420, 34, 370
    sx = _Scale(x_lo, x_hi, _LEFT, _W - _RIGHT)
    sy = _Scale(0.0, data.y_max or 1.0, bottom, top)
    out = [f'<svg id="memory" class="plot" viewBox="0 0 {_W} {height}" width="{_W}" '
           f'height="{height}" role="img" aria-label="per-worker memory over time">']  # fmt: skip
    for v in nice_ticks(data.y_max):
        y = sy(v)
        out.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{sx.px1}" y2="{y:.1f}"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    out.append(f'<text transform="translate({_LEFT - 50},{(top + bottom) / 2}) rotate(-90)" '
               'text-anchor="middle">worker memory, RSS (MiB)</text>')  # fmt: skip
    out += _x_axis(sx, bottom, top, "time since the run started (s)")
    out.append(f'<line class="axis" x1="{_LEFT}" y1="{top}" x2="{_LEFT}" y2="{bottom}"/>')
    out += _reference_lines(data, sx, sy)
    for s in data.series:
        d = _path(_downsample(s.xs, s.ys, _MAX_POINTS), sx, sy)
        out.append(
            f'<path class="series" data-worker="{_e(s.key)}" d="{d}" stroke="{s.color}">'
            f"<title>{_e(s.label or s.key)}: peak "
            f"{max((y for y in s.ys if y == y), default=0):,.0f} MiB</title></path>"
        )
    for k in data.kills:
        x, y = sx(k.x), sy(k.y)
        out.append(
            f'<g class="kill"><title>{_e(k.label)}</title>'
            f'<path d="M{x - 5:.1f},{y - 5:.1f}l10,10m0,-10l-10,10" stroke="#d62728" '
            f'stroke-width="2.5"/><text x="{x + 6:.1f}" y="{y - 6:.1f}" class="killno">'
            f"{k.number}</text></g>"
        )
    out += _tick_strip(ticks, sx, top, bottom, {s.key: s.color for s in data.series})
    out.append("</svg>")
    return "\n".join(out)


def _reference_lines(data: MemoryPlotData, sx: _Scale, sy: _Scale) -> list[str]:
    """The limit, thresholds and predicted peak in range, each labelled at the right
    (labels pushed apart when lines are close)."""
    out, last_y = [], -1e9
    for ref in sorted(data.lines, key=lambda r: -r.y):
        y = sy(ref.y)
        dash = _DASH.get(ref.style, "6,3") if isinstance(ref.style, str) else "6,3"
        color = "#000" if ref.color == "black" else ref.color
        out.append(
            f'<line class="ref" x1="{sx.px0}" y1="{y:.1f}" x2="{sx.px1}" y2="{y:.1f}" '
            f'stroke="{color}" stroke-width="{ref.width}" stroke-dasharray="{dash}">'
            f"<title>{_e(ref.label)}</title></line>"
        )
        ty = max(y + 4, last_y + 12)
        last_y = ty
        out.append(f'<text class="reflabel" x="{sx.px1 + 6}" y="{ty:.1f}" fill="{color}">'
                   f"{_e(ref.label)}</text>")  # fmt: skip
    return out


def _tick_strip(
    ticks: Sequence[Tick], sx: _Scale, top: float, bottom: float, colors: dict[str, str]
) -> list[str]:
    """Chunk starts as short ticks above the x axis (worker colour; one per pixel and
    worker), retries / splits as triangles above the plot, deaths as red lines."""
    out, seen = ['<g class="ticks">'], set()
    rows = {"retry": top - 22, "split": top - 10}
    kinds = {t.kind for t in ticks}
    crowded = sum(t.kind == "start" for t in ticks) > _MAX_START_TICKS  # one tick per pixel
    for kind, y in rows.items():
        if kind in kinds:
            out.append(f'<text x="{sx.px0 - 6}" y="{y + 3}" text-anchor="end">{kind}</text>')
    for t in ticks:
        x = sx(t.x)
        if t.kind == "start":
            spot = round(x) if crowded else (t.worker, round(x))
            if spot in seen:
                continue
            seen.add(spot)
            color = colors.get(t.worker, "#777")
            out.append(f'<line class="tick-start" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" '
                       f'y2="{bottom - 6}" stroke="{color}"/>')  # fmt: skip
        elif t.kind in rows:
            y = rows[t.kind]
            out.append(
                f'<path class="tick-{t.kind}" d="M{x - 4:.1f},{y - 4}{_TICK_SHAPES[t.kind]}" '
                f'fill="{_TICK_COLORS[t.kind]}"><title>{_e(t.label)} at {t.x:,.1f} s'
                "</title></path>"
            )
        else:
            out.append(
                f'<line class="tick-death" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                f'stroke="{_TICK_COLORS["death"]}" stroke-dasharray="3,3">'
                f"<title>{_e(t.label)} at {t.x:,.1f} s</title></line>"
            )
    out.append("</g>")
    return out


def _rows(bars: Sequence[ChunkBar]) -> list[list[ChunkBar]]:
    """Bars packed into rows without overlap (first row that is free)."""
    rows: list[list[ChunkBar]] = []
    ends: list[float] = []
    for b in sorted(bars, key=lambda b: b.start):
        for i, end in enumerate(ends):
            if b.start >= end - _OVERLAP_S:
                rows[i].append(b)
                ends[i] = b.stop
                break
        else:
            rows.append([b])
            ends.append(b.stop)
    return rows


def _merged(row: list[ChunkBar], min_gap_s: float) -> list[tuple[float, float, list[ChunkBar]]]:
    """Successful neighbours closer than ``min_gap_s`` as one span (failed bars alone)."""
    spans: list[tuple[float, float, list[ChunkBar]]] = []
    for b in row:
        last = spans[-1] if spans else None
        if last and b.ok and last[2][-1].ok and b.start - last[1] < min_gap_s:
            last[2].append(b)  # the same list: no copy per bar
            spans[-1] = (last[0], max(last[1], b.stop), last[2])
        else:
            spans.append((b.start, b.stop, [b]))
    return spans


def gantt_svg(
    bars: Sequence[ChunkBar],
    lanes: Sequence[tuple[str, str, str]],
    owner: dict[str, str],
    ticks: Sequence[Tick],
    x_hi: float,
    x_lo: float = 0.0,
) -> str:
    """The chunk timeline (id ``gantt``): a lane (``g.lane``) per worker ``(key, label,
    colour)``, a row per concurrent task; failed attempts red, retries outlined."""
    by_lane: dict[str, list[ChunkBar]] = {key: [] for key, _l, _c in lanes}
    for b in bars:
        by_lane.setdefault(owner.get(b.worker, b.worker), []).append(b)
    packed = {key: _rows(v) for key, v in by_lane.items()}
    row_h, top = 14, 10
    height = top + sum(max(1, len(r)) * row_h + 8 for r in packed.values()) + 42
    sx = _Scale(x_lo, x_hi, _LEFT, _W - _RIGHT)
    min_gap = 0.0 if len(bars) <= _MAX_BARS else (x_hi - x_lo) / (sx.px1 - sx.px0)
    out = [f'<svg id="gantt" class="plot" viewBox="0 0 {_W} {height}" width="{_W}" '
           f'height="{height}" role="img" aria-label="chunks per worker over time">']  # fmt: skip
    colors = {key: color for key, _l, color in lanes}
    labels = {key: label for key, label, _c in lanes}
    y = top
    out += _x_axis(sx, height - 42, top, "time since the run started (s)")
    for key, rows in packed.items():
        lane_h = max(1, len(rows)) * row_h
        color = colors.get(key, "#777")
        out.append(f'<g class="lane" data-worker="{_e(key)}">')
        out.append(f'<text x="{sx.px0 - 8}" y="{y + lane_h / 2 + 4:.1f}" text-anchor="end">'
                   f"{_e(labels.get(key, key))}</text>")  # fmt: skip
        for i, row in enumerate(rows):
            for start, stop, group in _merged(row, min_gap):
                out.append(_bar(sx, start, stop, y + i * row_h, row_h - 3, color, group))
        for t in ticks:
            if t.kind == "death" and t.worker == key:
                x = sx(t.x)
                out.append(f'<line class="tick-death" x1="{x:.1f}" y1="{y - 3}" x2="{x:.1f}" '
                           f'y2="{y + lane_h}" stroke="#d62728" stroke-width="2">'
                           f"<title>{_e(t.label)}</title></line>")  # fmt: skip
        out.append("</g>")
        y += lane_h + 8
    out.append("</svg>")
    return "\n".join(out)


def _bar(sx: _Scale, start: float, stop: float, y: float, h: float, color: str, group) -> str:
    x0, x1 = sx(start), sx(stop)
    first = group[0]
    if len(group) > 1:
        title = f"{len(group)} chunks, {first.chunk_id} .. {group[-1].chunk_id}"
    else:
        state = "ok" if first.ok else "failed"
        title = (f"{first.chunk_id} attempt {first.attempt} on {first.worker}: "
                 f"{start:,.2f} s to {stop:,.2f} s ({stop - start:,.2f} s), {state}")  # fmt: skip
    cls = "bar" + ("" if first.ok else " failed") + (" retry" if first.is_retry else "")
    fill = color if first.ok else "#d62728"
    rect = (f'<rect class="{cls}" x="{x0:.1f}" y="{y:.1f}" width="{max(1.0, x1 - x0):.1f}" '
            f'height="{h}" fill="{fill}"><title>{_e(title)}</title></rect>')  # fmt: skip
    name = first.chunk_id if len(group) == 1 else f"{len(group)} chunks"
    if x1 - x0 < 6 * len(name) + 6:  # too narrow to be named: the title says it
        return rect
    return rect + (f'<text class="barlabel" x="{x0 + 3:.1f}" y="{y + h - 2.5:.1f}">'
                   f"{_e(name)}</text>")  # fmt: skip


def peaks_svg(
    peaks: dict[str, int],
    lanes: Sequence[tuple[str, str, str]],
    predicted: int | None,
    limit: int | None,
) -> str:
    """Measured peak per worker (bars, id ``peaks``) against the predicted peak and,
    when in range, the limit."""
    colors = {key: color for key, _l, color in lanes}
    labels = {key: label for key, label, _c in lanes}
    keys = sorted(peaks, key=lambda k: ([key for key, _l, _c in lanes] + [k]).index(k))
    row_h, top = 20, 24
    height = top + row_h * max(1, len(keys)) + 40
    top_mib = max([p / _MIB for p in peaks.values()] + [(predicted or 0) / _MIB, 1.0])
    show_limit = bool(limit) and limit / _MIB <= 1.5 * top_mib
    hi = 1.1 * max(top_mib, limit / _MIB if show_limit else 0)
    sx = _Scale(0.0, hi, _LEFT, _W - _RIGHT)
    out = [f'<svg id="peaks" class="plot" viewBox="0 0 {_W} {height}" width="{_W}" '
           f'height="{height}" role="img" aria-label="measured peak per worker">']  # fmt: skip
    out += _x_axis(sx, height - 36, top, "peak RSS (MiB)")
    y = top
    for key in keys:
        mib = peaks[key] / _MIB
        out.append(
            f'<text x="{sx.px0 - 8}" y="{y + 14}" text-anchor="end">{_e(labels.get(key, key))}'
            f'</text><rect class="peak" data-worker="{_e(key)}" x="{sx.px0}" y="{y + 3}" '
            f'width="{max(1.0, sx(mib) - sx.px0):.1f}" height="{row_h - 6}" '
            f'fill="{colors.get(key, "#777")}"><title>{_e(key)}: {format_bytes(peaks[key])}'
            f'</title></rect><text x="{sx(mib) + 4:.1f}" y="{y + 14}">{mib:,.0f} MiB</text>'
        )
        y += row_h
    refs = [("predicted peak", predicted, "#9467bd")]
    refs += [("memory limit", limit, "#000")] if show_limit else []
    for name, value, color in refs:
        if value:
            x = sx(value / _MIB)
            out.append(
                f'<line class="ref" x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{y}" '
                f'stroke="{color}" stroke-dasharray="6,3" stroke-width="1.5"/>'
                f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle" fill="{color}">'
                f"{name} {value / _MIB:,.0f} MiB</text>"
            )
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------- the page ----

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1140px;color:#1d1d1f;padding:0 12px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}
.status{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-size:13px}
.finished,.already-finished{background:#2ca02c}.failed{background:#d62728}
.interrupted{background:#ff7f0e}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:12.5px;white-space:pre-wrap}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
svg.plot{display:block;max-width:100%;height:auto;font-size:11px;font-family:inherit}
svg .grid{stroke:#e5e5e5}svg .axis{stroke:#444}svg .series{fill:none;stroke-width:1.4}
svg .bar.retry{stroke:#000;stroke-width:1.2}svg .reflabel{font-size:10.5px}
svg .killno{fill:#d62728;font-weight:bold}
svg .barlabel{fill:#fff;font-size:9px;pointer-events:none}
.legend{list-style:none;padding:0;margin:6px 0;display:flex;flex-wrap:wrap;gap:4px 16px;
font-size:12.5px}.sw{display:inline-block;width:14px;height:4px;margin-right:5px;
vertical-align:middle}.note{color:#666;font-size:12.5px}
"""


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str] = ()) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_e(value)}</td>'
    return f"<td>{_e('–' if value is None else value)}</td>"


def _legend(data: MemoryPlotData, extra: Sequence[tuple[str, str]] = ()) -> str:
    items = [(s.color, s.label) for s in data.series if s.label]
    items += [(_TICK_COLORS[k], f"{k} (tick)") for k in ("retry", "split", "death")]
    items += list(extra)
    lis = "".join(f'<li><span class="sw" style="background:{c}"></span>{_e(t)}</li>'
                  for c, t in items)  # fmt: skip
    notes = [*data.legend_labels[len(data.worker_labels) :]]
    return f'<ul class="legend">{lis}</ul>' + "".join(
        f'<div class="note">{_e(n)}</div>' for n in notes if "above the plot" in n
    )


def _peaks_table(data: dict, lanes: Sequence[tuple[str, str, str]]) -> str:
    predicted, limit = data.get("predicted_peak_bytes"), data.get("memory_limit_bytes")
    labels = {key: label for key, label, _c in lanes}
    rows = []
    for key, peak in sorted((data.get("measured_peak_per_worker") or {}).items()):
        rows.append(
            (
                labels.get(key, key),
                format_bytes(peak),
                format_bytes(predicted) if predicted else "",
                f"{peak / predicted:.0%}" if predicted else "",
                f"{peak / limit:.0%}" if limit else "",
            )
        )
    head = ("worker", "measured peak", "predicted peak", "of predicted", "of limit")
    return _table(rows, head) if rows else '<p class="note">Memory was not measured.</p>'


def _plan_section(plan: dict | None) -> str:
    if not plan:
        return '<p class="note">No plan: the run used an existing cluster as it was.</p>'
    fields = [
        ("workers", plan.get("n_workers")),
        ("threads per worker", plan.get("threads_per_worker")),
        ("memory limit per worker", format_bytes(plan.get("memory_limit_bytes") or 0)),
        ("chunk size", f"{plan.get('chunk_size')} {plan.get('item_name') or 'item'}s"),
        ("chunks", plan.get("n_chunks")),
        ("items", plan.get("n_items")),
        ("predicted peak per worker", format_bytes(plan.get("predicted_peak_bytes") or 0)),
        ("footprint from", plan.get("footprint_source")),
        ("binding constraint", plan.get("binding")),
        ("Dask thresholds", ", ".join(f"{k} {v}" for k, v in (plan.get("thresholds") or {})
                                      .items())),
    ]  # fmt: skip
    reasons = "".join(f"<li>{_e(r)}</li>" for r in plan.get("reasons") or ())
    return _table([f for f in fields if f[1] is not None]) + f"<h3>Reasons</h3><ol>{reasons}</ol>"


def _deaths_section(deaths: Sequence[dict], t0: float, owner: dict[str, str]) -> str:
    if not deaths:
        return "<p>No worker died.</p>"
    rows = [
        (
            round(d["time"] - t0, 1) if d.get("time") is not None else None,
            owner.get(d.get("worker", ""), d.get("worker")),
            d.get("worker"),
            d.get("reason"),
            d.get("detail"),
            ", ".join(d.get("tasks") or ()),
            format_bytes(d["rss_bytes"]) if d.get("rss_bytes") else "",
            d.get("slurm_job_id", ""),
        )
        for d in deaths
    ]
    head = ("at (s)", "worker", "address", "reason", "detail", "chunks", "RSS", "SLURM job")
    return f'<div id="deaths">{_table(rows, head)}</div>'


def _provenance_section(prov: dict | None) -> str:
    if not prov:
        return '<p class="note">No provenance recorded.</p>'
    rows = [(k.replace("_", " "), v) for k, v in prov.items() if k != "versions"]
    rows += [(f"{name} version", v) for name, v in (prov.get("versions") or {}).items()]
    return f'<div id="provenance">{_table(rows)}</div>'


def _failures_section(data: dict) -> str:
    parts = []
    for f in data.get("failures") or ():
        parts.append(f"<p><b>{_e(f.get('chunk_id') or 'run')}</b>: {_e(f.get('error'))}</p>")
        if f.get("traceback"):
            parts.append(f"<pre>{_e(f['traceback'])}</pre>")
    if data.get("quarantined"):
        rows = [(q.get("item"), q.get("reason")) for q in data["quarantined"]]
        parts.append(f"<h3>Quarantined {_e(data.get('item_name') or 'item')}s</h3>"
                     + _table(rows, ("item", "reason")))  # fmt: skip
    return "".join(parts)


def _lanes(data: MemoryPlotData, bars: Sequence[ChunkBar], owner: dict[str, str]) -> list:
    """(key, label, colour) per worker: the memory plot's, then workers only seen in the
    task stream (no sampled memory)."""
    lanes = [(s.key, s.label or s.key, s.color) for s in data.series]
    known = {key for key, _l, _c in lanes}
    extra = sorted({owner.get(b.worker, b.worker) for b in bars} - known)
    n = len(lanes) + len(extra)
    lanes += [(key, key, _worker_color(len(lanes) + i, n)) for i, key in enumerate(extra)]
    return lanes


def render_html(
    data: dict,
    *,
    timelines: Sequence[dict] = (),
    thresholds: dict | None = None,
    t0: float,
    t_end: float,
    task_stream: Sequence[dict] = (),
    group: str | None = None,
    files: Sequence[str] = (),
) -> str:
    """The page for report dict ``data`` (``RunReport.to_dict()``); ``t0``/``t_end``:
    the run's start and end (epoch s); ``files``: names of the run directory's other
    files, linked relatively."""
    deaths = data.get("worker_deaths") or []
    plot = memory_plot_data(
        list(timelines),
        t0=t0,
        memory_limit_bytes=data.get("memory_limit_bytes"),
        thresholds=thresholds,
        predicted_peak_bytes=data.get("predicted_peak_bytes"),
        deaths=deaths,
    )
    owner = address_owners(list(timelines))
    bars = chunk_bars(task_stream, t0, group)
    ticks = timeline_ticks(bars, deaths, t0, owner)
    lanes = _lanes(plot, bars, owner)
    xs = [x for s in plot.series for x in (s.xs[:1] + s.xs[-1:])] + [b.stop for b in bars]
    x_lo, x_hi = min([0.0] + xs), max([t_end - t0, 1.0] + xs)
    status = str(data.get("status", "?"))
    links = " · ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in files)
    body = [
        f"<h1>hpcbatch run {_e(data.get('run_id'))} "
        f'<span class="status {_e(status)}">{_e(status)}</span></h1>',
        f'<p class="note">{links}</p>' if links else "",
        f'<pre id="summary">{_e(summary_text(data))}</pre>',
        "<h2>Plan</h2>", _plan_section(data.get("plan")),
        "<h2>Peak memory per worker: predicted vs measured</h2>",
        peaks_svg(data.get("measured_peak_per_worker") or {}, lanes,
                  data.get("predicted_peak_bytes"), data.get("memory_limit_bytes")),
        _peaks_table(data, lanes),
        "<h2>Memory over time</h2>",
        memory_svg(plot, ticks, x_hi, x_lo), _legend(plot),
        "<h2>Chunks over time (by worker)</h2>",
        gantt_svg(bars, lanes, owner, ticks, x_hi, x_lo) if bars else
        '<p class="note">No chunk ran on the cluster (or the task stream was unavailable).</p>',
        f'<p class="note">{len(bars)} tasks; failed attempts red; retries outlined black.</p>',
        "<h2>Worker deaths</h2>", _deaths_section(deaths, t0, owner),
        _failures_section(data),
        "<h2>Provenance</h2>", _provenance_section(data.get("provenance")),
    ]  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>hpcbatch run {_e(data.get('run_id'))}</title><style>{_CSS}</style></head>"
        "<body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )


def write_html_report(directory: str | Path, data: dict, **kwargs: Any) -> Path:
    """Write ``<directory>/report.html`` (see :func:`render_html` for ``kwargs``)."""
    directory = Path(directory)
    names = ("report.json", "memory.png", "dask-report.html")
    files = [n for n in names if (directory / n).exists()]
    text = render_html(data, files=kwargs.pop("files", files), **kwargs)
    tmp = directory / "report.html.tmp"
    tmp.write_text(text, encoding="utf-8")
    return tmp.replace(directory / "report.html")


def task_stream_of(client, since: float) -> list[dict]:
    """The scheduler's task stream records since ``since`` (epoch s); [] when it has
    none (the stream plugin is installed by the run's performance report)."""
    try:
        return list(client.get_task_stream(start=since))
    except Exception as exc:  # noqa: BLE001 (an old or foreign scheduler)
        log.warning("no task stream for the report's chunk timeline: %s", exc)
        return []


_EXTERNAL_LINK = re.compile(r"""<link\b[^>]*\bhref\s*=\s*["']?(?:https?:)?//[^>]*>\s*""", re.I)
_EXTERNAL_SCRIPT = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*["']?(?:https?:)?//""", re.I)


def make_offline(path: str | Path) -> bool:
    """Drop the ``<link>`` tags of an HTML file that point to another host (Dask's
    performance report links its favicon from docs.dask.org); True when no script is
    loaded from elsewhere either (Bokeh written inline), so the file opens offline."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    cleaned = _EXTERNAL_LINK.sub("", text)
    if cleaned != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(cleaned, encoding="utf-8")
        tmp.replace(path)
    offline = not _EXTERNAL_SCRIPT.search(cleaned)
    if not offline:
        log.warning("%s loads scripts from the network: it needs one to open", path)
    return offline


def write_html_report_of(client, directory: str | Path, data: dict, **kwargs: Any) -> Path | None:
    """:func:`write_html_report` with the chunk timeline from ``client``'s scheduler;
    a page that cannot be drawn is logged, never fails the run (report.json stands)."""
    try:
        dask_report = Path(directory) / "dask-report.html"
        if dask_report.is_file():
            make_offline(dask_report)
        stream = task_stream_of(client, kwargs["t0"] - 1)
        return write_html_report(directory, data, task_stream=stream, **kwargs)
    except OSError:
        raise
    except Exception:  # noqa: BLE001
        log.exception("report.html of run %s could not be written", data.get("run_id"))
        return None
