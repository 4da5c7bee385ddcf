"""What each dashboard page shows, rendered as HTML from the store, presence and live telemetry.

Each page returns its parts: `live` is what the page's /events stream re-renders and swaps in, so
everything that changes while an operator watches lives there; forms being typed into stay outside.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import urlencode

from edgefleet.controller.dashboard.charts import line_chart
from edgefleet.controller.fleet.commands import INSTALLED_RESULTS
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.plan import parse_gate
from edgefleet.controller.rollouts.states import OPERATOR_ACTIONS, ROLLOUT_TRANSITIONS, RolloutEvent, RolloutState
from edgefleet.controller.store.base import DeviceRecord, Store, TelemetryPoint
from edgefleet.controller.telemetry import histograms
from edgefleet.controller.telemetry.ingest import LiveTelemetry
from edgefleet.protos.v1 import profile_pb2

PAGE_SIZE = 50
SNAPSHOT_TTL_S = 1.0
CHART_WINDOW_MS = 10 * 60 * 1000
ACTIVE_ROLLOUT_STATES = {RolloutState.PLANNING.value, RolloutState.RUNNING.value, RolloutState.PAUSED.value}


class PageNotFound(Exception):
    """The id in the address names nothing; the message is shown on a 404 page."""


@dataclasses.dataclass(frozen=True)
class Page:
    title: str
    live: str
    static: str = ""


@dataclasses.dataclass(frozen=True)
class DeviceRow:
    record: DeviceRecord
    online: bool
    presence: str
    last_seen_ms: int
    p95_ms: float | None
    point: TelemetryPoint | None


@dataclasses.dataclass(frozen=True)
class Viewer:
    """Who is looking: whether they may press buttons, and the CSRF token their forms carry."""

    can_act: bool
    csrf: str
    role: str


def _fmt_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z" if ms else "never"


def _ago(ms: int) -> str:
    if not ms:
        return "never"
    s = max(0.0, time.time() - ms / 1000)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _num(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}{unit}"


def _table(headers: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _device_link(device_id: str) -> str:
    return f'<a href="/devices/{escape(device_id)}">{escape(device_id)}</a>'


def _rollout_link(rollout_id: str) -> str:
    return f'<a href="/rollouts/{escape(rollout_id)}">{escape(rollout_id)}</a>'


def _p95(point: TelemetryPoint | None, record: DeviceRecord) -> float | None:
    if point is None or not point.models:
        return None
    served = [m for m in point.models if m.model == record.model] or list(point.models)
    return max(m.p95_ms for m in served)


class DashboardData:
    """The fleet as the pages read it; the per-device join is cached briefly, since every open
    tab's stream re-renders once a second and a 10,000-device join costs tens of milliseconds."""

    def __init__(self, store: Store, presence: PresenceTracker, live: LiveTelemetry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.presence = presence
        self.live = live
        self.clock = clock
        self.device_metrics: Callable[[str, str, int, int], dict[str, float]] | None = None
        self._lock = threading.Lock()
        self._snapshot: tuple[float, list[DeviceRow]] | None = None

    def device_rows(self) -> list[DeviceRow]:
        with self._lock:
            if self._snapshot is not None and self.clock() - self._snapshot[0] < SNAPSHOT_TTL_S:
                return self._snapshot[1]
        latest = self.store.latest_telemetry()
        for device_id, fresh in self.live.snapshot()[0].items():
            stored = latest.get(device_id)
            if stored is None or fresh.end_ms >= stored.end_ms:
                latest[device_id] = fresh
        rows = []
        for record in self.store.list_devices():
            presence = self.presence.presence(record)
            point = latest.get(record.device_id)
            rows.append(DeviceRow(record, presence.online, presence.reason, presence.last_seen_ms,
                                  _p95(point, record), point))
        rows.sort(key=lambda r: r.record.device_id)
        with self._lock:
            self._snapshot = (self.clock(), rows)
        return rows

    # -- pages --------------------------------------------------------------------------------
    def fleet(self) -> Page:
        rows = self.device_rows()
        per_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        versions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        watts = 0.0
        for row in rows:
            cls = row.record.hardware_class or "(unprofiled)"
            per_class[cls][0 if row.online else 1] += 1
            versions[cls][f"{row.record.model}:{row.record.model_version}" if row.record.model else "(none)"] += 1
            if row.online and row.point is not None:
                watts += row.point.watts
        _, fleet_hist, _ = self.live.snapshot()
        p95 = {f"{model}:{version}": histograms.to_proto(counts).p95_ms
               for (model, version), counts in sorted(fleet_hist.items()) if counts.sum()}
        online = sum(r.online for r in rows)
        html = [f'<div class="tiles"><div class="tile"><b id="fleet-online">{online}</b> of {len(rows)} online</div>',
                f'<div class="tile"><b id="fleet-watts">{watts:.3g} W</b> fleet power (online devices)</div>']
        html += [f'<div class="tile"><b>{v:.3g} ms</b> fleet p95 {escape(k)}</div>' for k, v in p95.items()]
        html.append("</div><h2>Devices per hardware class</h2>")
        html.append(_table(["class", "online", "offline", "model versions"], [
            [escape(cls), str(n[0]), str(n[1]),
             ", ".join(f"{escape(v)} ×{c}" for v, c in versions[cls].most_common())]
            for cls, n in sorted(per_class.items())]))
        rollouts = self.store.list_rollouts()
        active = [r for r in rollouts if r.state in ACTIVE_ROLLOUT_STATES]
        html.append("<h2>Active rollouts</h2>")
        html.append(_table(["rollout", "model", "state", "wave", "reason"], [
            [_rollout_link(r.rollout_id), f"{escape(r.model)}:{r.version}", f'<span class="state">{r.state}</span>',
             str(r.wave + 1), escape(r.reason)] for r in active]))
        breaches = [r for r in rollouts if "breach" in r.reason or "gate" in r.reason
                    or r.state in (RolloutState.ROLLED_BACK.value, RolloutState.FAILED.value)]
        html.append("<h2>Recent breaches</h2>")
        html.append(_table(["rollout", "state", "when", "reason"], [
            [_rollout_link(r.rollout_id), r.state, _fmt_time(r.updated_at_ms), escape(r.reason)]
            for r in sorted(breaches, key=lambda r: -r.updated_at_ms)[:10]]))
        failed = [c for c in self.store.list_commands() if c.kind == "install" and c.state in ("done", "expired")
                  and c.result not in INSTALLED_RESULTS]
        html.append("<h2>Failed installs</h2>")
        html.append(_table(["device", "rollout", "when", "result", "why"], [
            [_device_link(c.device_id), _rollout_link(c.rollout_id) if c.rollout_id else "", _fmt_time(c.updated_at_ms),
             escape(c.result), escape(c.reason or c.message)]
            for c in sorted(failed, key=lambda c: -c.updated_at_ms)[:10]]))
        return Page("Fleet", "".join(html))

    def devices(self, query: dict[str, str]) -> Page:
        rows = self.device_rows()
        cls, state, model = query.get("class", ""), query.get("state", ""), query.get("model", "")
        label, search = query.get("label", ""), query.get("q", "").strip().lower()
        key, _, value = label.partition("=")
        picked = [r for r in rows
                  if (not cls or r.record.hardware_class == cls)
                  and (not state or (state == "online") == r.online)
                  and (not model or r.record.model == model or f"{r.record.model}:{r.record.model_version}" == model)
                  and (not label or r.record.labels.get(key.strip()) == value.strip())
                  and (not search or search in r.record.device_id.lower() or search in r.record.hostname.lower())]
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        pages = max(1, -(-len(picked) // PAGE_SIZE))
        page = min(page, pages)
        shown = picked[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        table = _table(["device", "state", "class", "model", "p95", "last seen", "labels"], [
            [_device_link(r.record.device_id),
             f'<span class="{"on" if r.online else "off"}">{"online" if r.online else "offline"}</span>',
             escape(r.record.hardware_class),
             escape(f"{r.record.model}:{r.record.model_version}" if r.record.model else ""),
             f'<span class="p95">{_num(r.p95_ms, " ms")}</span>', _ago(r.last_seen_ms),
             escape(", ".join(f"{k}={v}" for k, v in sorted(r.record.labels.items())))] for r in shown],
            css="devices")

        def link(n: int) -> str:
            return f"/devices?{urlencode({**query, 'page': str(n)})}"

        nav = f'<div class="pager">{len(picked)} devices, page {page} of {pages} '
        if page > 1:
            nav += f'<a href="{escape(link(page - 1))}">‹ previous</a> '
        if page < pages:
            nav += f'<a href="{escape(link(page + 1))}">next ›</a>'
        nav += "</div>"
        classes = sorted({r.record.hardware_class for r in rows if r.record.hardware_class})
        models = sorted({f"{r.record.model}:{r.record.model_version}" for r in rows if r.record.model})

        def select(name: str, options: list[str], current: str) -> str:
            opts = "".join(f'<option value="{escape(o)}"{" selected" if o == current else ""}>{escape(o or "any")}'
                           "</option>" for o in ["", *options])
            return f'<label>{name} <select name="{name}">{opts}</select></label>'

        form = ('<form class="filters" method="get" action="/devices">'
                f'<label>search <input name="q" value="{escape(query.get("q", ""))}" placeholder="device id"></label>'
                + select("class", classes, cls) + select("state", ["online", "offline"], state)
                + select("model", models, model)
                + f'<label>label <input name="label" value="{escape(label)}" placeholder="site=lab"></label>'
                '<button type="submit">filter</button></form>')
        return Page("Devices", nav + table, static=form)

    def device(self, device_id: str) -> Page:
        record = self.store.get_device(device_id)
        if record is None:
            raise PageNotFound(f"no device {device_id!r}; see /devices")
        presence = self.presence.presence(record)
        html = [f'<p><span class="{"on" if presence.online else "off"}">{escape(presence.reason)}</span>, '
                f"last seen {_ago(presence.last_seen_ms)}; class <b>{escape(record.hardware_class)}</b>; serving "
                f"<b>{escape(f'{record.model}:{record.model_version}' if record.model else 'nothing')}</b>; "
                f"agent {escape(record.agent_version)}, host {escape(record.hostname)}</p>"]
        html.append(self._charts(record))
        html.append(self._profile(record))
        commands = sorted(self.store.list_commands(device_id=device_id), key=lambda c: -c.created_at_ms)
        installs = [c for c in commands if c.kind == "install"]
        html.append("<h2>Install history</h2>")
        html.append(_table(["when", "rollout", "state", "result", "reason"], [
            [_fmt_time(c.created_at_ms), _rollout_link(c.rollout_id) if c.rollout_id else "", c.state,
             escape(c.result), escape(c.reason or c.message)] for c in installs[:20]]))
        html.append("<h2>Recent commands</h2>")
        html.append(_table(["when", "command", "kind", "state", "result"], [
            [_fmt_time(c.created_at_ms), escape(c.command_id), escape(c.kind), c.state, escape(c.result)]
            for c in commands[:20]]))
        return Page(f"Device {device_id}", "".join(html))

    def _charts(self, record: DeviceRecord) -> str:
        since = int(time.time() * 1000) - CHART_WINDOW_MS
        points = self.store.telemetry_window(record.device_id, since)[-300:]
        models = [m for p in points for m in p.models]
        model = record.model or (models[-1].model if models else "")
        lat: dict[str, list[tuple[int, float]]] = {"p50": [], "p95": [], "p99": []}
        thr: dict[str, list[tuple[int, float]]] = {"inferences/s": []}
        err: dict[str, list[tuple[int, float]]] = {"errors": []}
        energy: dict[str, list[tuple[int, float]]] = {"mJ/inference": []}
        energy_sources: set[str] = set()
        for p in points:
            seconds = max(1e-3, (p.end_ms - p.start_ms) / 1000)
            for m in p.models:
                if m.model != model:
                    continue
                lat["p50"].append((p.end_ms, m.p50_ms))
                lat["p95"].append((p.end_ms, m.p95_ms))
                lat["p99"].append((p.end_ms, m.p99_ms))
                thr["inferences/s"].append((p.end_ms, m.count / seconds))
                err["errors"].append((p.end_ms, float(m.errors)))
                if m.energy_mj:
                    energy["mJ/inference"].append((p.end_ms, m.energy_mj))
                    energy_sources.add(m.energy_source or "unknown")
        watt_sources = sorted({p.power_source or "unknown" for p in points})
        charts = [
            line_chart(f"latency {model}", lat, " ms"),
            line_chart("throughput", thr),
            line_chart("errors per batch", err),
            line_chart("CPU", {"system": [(p.end_ms, p.cpu_system) for p in points],
                               "agent": [(p.end_ms, p.cpu_process) for p in points]}, " %"),
            line_chart("temperature", {"°C": [(p.end_ms, p.temperature_c) for p in points
                                              if p.temperature_c is not None]}, " °C"),
            line_chart("power", {"W": [(p.end_ms, p.watts) for p in points]}, " W",
                       note="source: " + (", ".join(watt_sources) or "none")),
            line_chart("energy per inference", energy, " mJ",
                       note="source: " + (", ".join(sorted(energy_sources)) or "none")),
        ]
        return '<h2>Live telemetry (last 10 min)</h2><div class="charts">' + "".join(charts) + "</div>"

    def _profile(self, record: DeviceRecord) -> str:
        profile = profile_pb2.HardwareProfile()
        if record.profile:
            profile.ParseFromString(record.profile)
        cpu = profile.cpu
        html = ["<h2>Profile</h2><dl>",
                f"<dt>CPU</dt><dd>{escape(cpu.arch)} {escape(cpu.vendor)} {escape(cpu.model)}, "
                f"{cpu.physical_cores} cores / {cpu.logical_cores} threads</dd>",
                f'<dt>ISA</dt><dd class="isa">{escape(" ".join(cpu.isa_features)) or "–"}</dd>',
                f"<dt>memory</dt><dd>{profile.memory.total_bytes / 2**30:.1f} GiB</dd>",
                f"<dt>OS</dt><dd>{escape(profile.os.distro)} {escape(profile.os.kernel)} "
                f"{escape(profile.os.board_model)}</dd></dl>"]
        html.append("<h3>Accelerators</h3>")
        html.append(_table(["kind", "vendor", "model", "driver", "found by"], [
            [escape(a.kind), escape(a.vendor), escape(a.model), escape(a.driver), escape(a.source)]
            for a in profile.accelerators]))
        html.append("<h3>Runtimes</h3>")
        html.append(_table(["runtime", "version", "loaded", "advertised but did not load"], [
            [escape(r.name), escape(r.version), escape(", ".join(r.loadable_providers)),
             escape(", ".join(sorted(set(r.available_providers) - set(r.loadable_providers))))
             + "".join(f"<br>{escape(d.name)}: {escape(d.error)}" for d in r.devices if not d.loadable)]
            for r in profile.runtimes]))
        html.append("<h3>What the profile could not read</h3>")
        html.append(_table(["what", "why"], [[escape(g.what), escape(g.reason)] for g in profile.gaps]))
        return "".join(html)

    def models(self) -> Page:
        classes = sorted({d.hardware_class for d in self.store.list_devices() if d.hardware_class})
        html = []
        by_name: dict[str, list[Any]] = collections.defaultdict(list)
        for m in self.store.list_models():
            by_name[m.name].append(m)
        for name, versions in sorted(by_name.items()):
            html.append(f"<h2>{escape(name)}</h2>")
            for m in sorted(versions, key=lambda m: -m.version):
                html.append(f"<h3>{escape(name)}:{m.version} <small>{m.format}, sha256 {m.sha256[:12]}, "
                            f"gate {escape(m.metric or 'cosine')} ≥ {m.budget:g}</small></h3>")
                rows = []
                for cls in classes:
                    build = self.store.get_build(m.name, m.version, cls)
                    if build is None:
                        continue
                    report = json.loads(build.report) if build.report else {}
                    result = report.get("result", {}) if isinstance(report.get("result"), dict) else {}
                    rows.append([escape(cls), build.state, escape(str(report.get("chosen") or result.get("recipe")
                                                                      or "")),
                                 escape(str(result.get("runtime") or "")),
                                 _num(float(report.get("speedup") or 0) or None, "×"),
                                 _num(float(report.get("size_ratio") or 0) or None, "×"),
                                 escape(build.error)
                                 + (f"<details><summary>compile report</summary><pre>"
                                    f"{escape(json.dumps(report, indent=2, sort_keys=True))}</pre></details>"
                                    if report else "")])
                html.append(_table(["class", "build", "recipe", "runtime", "speedup", "size ratio", "report"], rows))
        if not by_name:
            html.append('<p class="empty">no models yet; add one with <code>edgefleet models add</code></p>')
        # The reports stay open across refreshes only if the page does not refresh: it has no live stream.
        return Page("Models", "", static="".join(html))

    def rollout(self, rollout_id: str, viewer: Viewer) -> Page:
        record = self.store.get_rollout(rollout_id)
        if record is None:
            raise PageNotFound(f"no rollout {rollout_id!r}; see the fleet page")
        rows = self.store.rollout_devices(rollout_id)
        html = [f'<p>{escape(record.model)}:{record.version} to <code>{escape(record.selector)}</code>, waves '
                f'{escape(record.waves)}, soak {record.soak_s:g}s; state <b class="state" id="rollout-state">'
                f'{record.state}</b>, wave {record.wave + 1}'
                + (f"; {escape(record.reason)}" if record.reason else "") + "</p>"]
        # The buttons the transition table allows from this state; the engine checks again on the press.
        state = RolloutState(record.state) if record.state in {r.value for r in RolloutState} else None
        allowed = {event.value: state is not None and (state, event) in ROLLOUT_TRANSITIONS
                   and (event != RolloutEvent.ROLLBACK or any(r.command_id for r in rows))
                   for event in OPERATOR_ACTIONS}
        buttons = []
        for action, ok in allowed.items():
            disabled = "" if ok and viewer.can_act else " disabled"
            why = "" if viewer.can_act else f' title="role {escape(viewer.role)} cannot change rollouts"'
            buttons.append(f'<button type="submit" name="action" value="{action}" id="btn-{action}"{disabled}{why}>'
                           f"{action}</button>")
        html.append(f'<form method="post" action="/rollouts/{escape(rollout_id)}/action" class="actions">'
                    f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">{"".join(buttons)}</form>')
        waves: dict[tuple[int, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for r in rows:
            waves[(r.wave, r.hardware_class)][r.state] += 1
        html.append("<h2>Waves</h2>")
        html.append(_table(["wave", "class", "progress", "states"], [
            [str(w + 1), escape(cls), f'<progress max="{sum(c.values())}" value="{c["committed"]}"></progress> '
             f'{c["committed"]}/{sum(c.values())}', escape(", ".join(f"{s} {n}" for s, n in sorted(c.items())))]
            for (w, cls), c in sorted(waves.items())]))
        html.append("<h2>Gates</h2>")
        gate_rows = []
        for gate_text in json.loads(record.gates or "[]"):
            gate = parse_gate(gate_text)
            for r in rows:
                if r.state != "committed" or self.device_metrics is None:
                    continue
                value = self.device_metrics(r.device_id, record.model, record.version, r.finished_at_ms).get(
                    gate.metric)
                base = json.loads(r.baseline or "{}").get(gate.metric)
                limit = gate.limit * base if gate.relative and base else (None if gate.relative else gate.limit)
                verdict = "–" if value is None or limit is None else ("breach" if value > limit else "ok")
                gate_rows.append([escape(gate_text), _device_link(r.device_id), _num(value), _num(base),
                                  _num(limit), f'<span class="{verdict}">{verdict}</span>'])
        html.append(_table(["gate", "device", "live", "baseline", "limit", ""], gate_rows))
        breached = [r for r in rows if r.reason]
        html.append("<h2>Breaches and failures</h2>")
        if record.reason and record.state != RolloutState.RUNNING.value:
            html.append(f'<p class="error" id="rollout-reason">{escape(record.reason)}</p>')
        html.append(_table(["device", "class", "state", "why"], [
            [_device_link(r.device_id), escape(r.hardware_class), r.state, escape(r.reason)] for r in breached]))
        html.append("<h2>Devices</h2>")
        html.append(_table(["device", "class", "wave", "state", "previous model", "dispatched", "finished"], [
            [_device_link(r.device_id), escape(r.hardware_class), str(r.wave + 1),
             f'<span class="state">{r.state}</span>',
             escape(f"{r.previous_model}:{r.previous_version}" if r.previous_model else ""),
             _fmt_time(r.dispatched_at_ms), _fmt_time(r.finished_at_ms)] for r in rows]))
        return Page(f"Rollout {rollout_id}", "".join(html))
