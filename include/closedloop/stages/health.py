"""What the "Model health" page shows, gathered from the registry, the lake and MLflow; and the page itself.

:func:`gather` returns one JSON-safe mapping: the champion with its holdout metrics, the promotion history
with its reasons (:mod:`closedloop.stages.registry`), the latest drift figures and decision and the series of drift
share and model quality per monitored window (the ``closedloop-monitoring`` MLflow experiment, one run per
window, completed by the lake's ``reports/drift/<start>_<end>/figures.json`` for windows MLflow lacks), and
the thresholds the latest decision used (calibrated with the champion or fixed, ``docs/explanation/DRIFT.md``) with each
feature's statistic against its threshold, estimated (CBPE) vs realised ROC AUC per window with their bands, and
the latest training/serving skew report (``reports/skew/<day>.json``, :mod:`closedloop.stages.skew`).
:func:`render_page` turns it into one self-contained HTML page with inline SVG plots (no JavaScript);
:func:`report_bytes` reads one report from the lake for a path that names a known kind of report only,
so the page can link reports even when the lake is ``s3://``; ``validation/<start>_<end>.json`` is assembled from
the validation records of the window's partitions (:func:`validation_report`, what the validating tasks link).
All of it is of one model (the Runtime's); :func:`model_choices` lists the deployment's models with their
configuration's error, for the page's selector (:func:`model_selector`) and the exporter.

No Airflow here: the Airflow plugin (``plugins/model_health.py``) authenticates and calls these.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from closedloop.core.errors import ConfigError, ContractError
from closedloop.core.lake import KINDS
from closedloop.core.schema import load_contract
from closedloop.core.settings import Settings, model_entries
from closedloop.stages import drift, registry
from closedloop.stages.ingest import marker_uri
from closedloop.stages.monitoring import TAG
from closedloop.stages.quarantine import REPORT_SUFFIX, quarantined_days

if TYPE_CHECKING:
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

HISTORY_LIMIT = 20
SERIES_LIMIT = 200

# the only report paths the page serves: a drift window's HTML or figures, a day's skew report
_DRIFT_FILE = re.compile(r"^drift/(\d{4}-\d{2}-\d{2})_(\d{4}-\d{2}-\d{2})/(report\.html|figures\.json)$")
_SKEW_FILE = re.compile(r"^skew/(\d{4}-\d{2}-\d{2})\.json$")
_VALIDATION_FILE = re.compile(r"^validation/(\d{4}-\d{2}-\d{2})_(\d{4}-\d{2}-\d{2})\.json$")
VALIDATION_MAX_DAYS = 366  # a validation report spans at most a year of days


class ReportNotFound(LookupError):
    """The path names no report the page serves, or the report is not in the lake."""


def _window_key(start: str, end: str) -> str:
    return f"{start}_{end}"


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def drift_reports(rt: Runtime) -> list[dict[str, Any]]:
    """The drift reports kept in the lake, oldest window first: window, figures, decision and report paths."""
    out = []
    for folder in drift.list_reports(rt.lake):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        js = f"{folder}/{drift.REPORT_JSON}"
        if not rt.lake.exists(js):
            continue
        try:
            doc = rt.lake.read_json(js)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable drift report (%s); left out of the page", js, exc)
            continue
        out.append({**doc, "name": name,
                    "html_path": f"drift/{name}/{drift.REPORT_HTML}"
                    if rt.lake.exists(f"{folder}/{drift.REPORT_HTML}") else None,
                    "json_path": f"drift/{name}/{drift.REPORT_JSON}"})
    return out


def monitoring_series(rt: Runtime) -> list[dict[str, Any]]:
    """Drift share and quality per window from the ``closedloop-monitoring`` experiment, oldest first."""
    exp = rt.client.get_experiment_by_name(rt.settings.monitoring_experiment)
    if exp is None:
        return []
    runs = rt.client.search_runs([exp.experiment_id], max_results=SERIES_LIMIT,
                                 order_by=["attributes.start_time DESC"])
    points = []
    for r in runs:
        start, sep, end = (r.data.tags.get(f"{TAG}window") or "").partition("..")
        if not sep:
            continue
        m = r.data.metrics
        points.append({"window": {"start": start, "end": end}, "drift_share": _number(m.get("drift_share")),
                       "roc_auc": _number(m.get("quality_roc_auc")),
                       "reference_roc_auc": _number(m.get("quality_reference_roc_auc")),
                       "estimated": _number(m.get("estimated_roc_auc")),
                       "estimated_lower": _number(m.get("estimated_roc_auc_lower")),
                       "realised": _number(m.get("realised_roc_auc")),
                       "realised_lower": _number(m.get("realised_roc_auc_lower")),
                       "aggregate": _number(m.get("drift_aggregate")),
                       "drift": r.data.tags.get(f"{TAG}drift") == "true",
                       "champion_version": r.data.tags.get(f"{TAG}champion_version")})
    return points


def _series(reports: list[dict[str, Any]], mlflow_points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per window (MLflow's figures, then the lake's for windows MLflow lacks), by window end."""
    by_window: dict[str, dict[str, Any]] = {}
    for rep in reports:
        f, w = rep.get("figures") or {}, rep.get("window") or {}
        q = f.get("quality") or {}
        perf = f.get("performance") or {}
        agg = (rep.get("thresholds") or {}).get("aggregate") or {}
        by_window[_window_key(w.get("start", ""), w.get("end", ""))] = {
            "window": w, "drift_share": _number(f.get("drift_share")), "roc_auc": _number(q.get("roc_auc")),
            "reference_roc_auc": _number(q.get("reference_roc_auc")),
            "estimated": _number(perf.get("estimated")),
            "estimated_lower": _number((perf.get("estimated_band") or {}).get("lower")),
            "realised": _number(perf.get("realised")),
            "realised_lower": _number((perf.get("realised_band") or {}).get("lower")),
            "aggregate": _number(agg.get("value")),
            "drift": bool((rep.get("decision") or {}).get("drift")), "champion_version": None}
    for p in mlflow_points:
        by_window[_window_key(p["window"]["start"], p["window"]["end"])] = p
    return sorted(by_window.values(), key=lambda p: (p["window"].get("end", ""), p["window"].get("start", "")))


def latest_skew(rt: Runtime) -> dict[str, Any] | None:
    """The newest ``reports/skew/<day>.json`` (its summary fields and path), or None."""
    base = rt.lake.uri("reports", "skew")
    if not rt.lake.exists(base):
        return None
    days = sorted(name for name in (str(p).rstrip("/").rsplit("/", 1)[-1] for p in rt.lake.fs.ls(base, detail=False))
                  if _SKEW_FILE.match(f"skew/{name}"))
    if not days:
        return None
    report = rt.lake.read_json(rt.lake.uri("reports", "skew", days[-1]))
    keep = ("day", "served_rows", "sampled", "passed", "reasons", "mismatch_share", "feature_mismatch_share",
            "score_mismatch_share", "score_max_abs_diff", "model_versions")
    return {**{k: report.get(k) for k in keep}, "json_path": f"skew/{days[-1]}"}


def model_choices(env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every model of the deployment (:func:`closedloop.core.settings.model_entries`, sorted by name) as
    ``{"name": ..., "error": None}``, or with ``error`` the one-line-per-problem message of a configuration (its
    ``closedloop.yaml`` or its schema) that is refused: what the page's selector lists and the exporter's
    ``closedloop_model_config_ok`` says. ConfigError only when the models cannot be listed at all."""
    out = []
    for entry in model_entries(env):
        error = None
        try:
            load_contract(Settings.from_env(env, model=entry.name).config.schema_path)
        except (ConfigError, ContractError) as exc:
            error = str(exc)
            log.warning("model %s: configuration refused, left out of the page and the metrics: %s", entry.name, exc)
        out.append({"name": entry.name, "error": error})
    return out


def gather(rt: Runtime) -> dict[str, Any]:
    """Everything the page shows, JSON-safe (see the module docstring)."""
    status = registry.status(rt.client, rt.settings, rt.model_name)
    policy = drift.DriftPolicy.from_config(rt.settings.config.monitoring.model_dump())
    reports = drift_reports(rt)
    latest = reports[-1] if reports else None
    return {
        "model": rt.model_name,
        "tracking_uri": rt.settings.mlflow_tracking_uri,
        "champion": status["champion"],
        "candidates": [v for v in status["versions"] if "champion" not in v["aliases"]][:10],
        "history": status["history"][:HISTORY_LIMIT],
        "drift_share_threshold": policy.drift_share_threshold,
        "latest_drift": None if latest is None else {
            "window": latest.get("window"), "figures": latest.get("figures"), "decision": latest.get("decision"),
            "thresholds": latest.get("thresholds"), "html_path": latest["html_path"], "json_path": latest["json_path"]},
        "drift_reports": [{"window": r.get("window"), "drift": bool((r.get("decision") or {}).get("drift")),
                           "html_path": r["html_path"], "json_path": r["json_path"]} for r in reversed(reports)],
        "series": _series(reports, monitoring_series(rt)),
        "skew": latest_skew(rt),
        "rollout": status.get("rollout"),
    }


def report_bytes(rt: Runtime, path: str) -> tuple[bytes, str]:
    """The bytes and media type of ``reports/<path>`` in the lake, for the report paths :func:`gather` gives.

    Any other path (another zone, ``..``, an unknown file) raises ReportNotFound, as does a missing report.
    """
    m_drift, m_skew, m_val = _DRIFT_FILE.match(path), _SKEW_FILE.match(path), _VALIDATION_FILE.match(path)
    try:
        if m_val:
            start, end = date.fromisoformat(m_val[1]), date.fromisoformat(m_val[2])
            if not 0 < (end - start).days <= VALIDATION_MAX_DAYS:
                raise ValueError(f"a window of 1 to {VALIDATION_MAX_DAYS} days")
        elif m_drift:
            start, end = date.fromisoformat(m_drift[1]), date.fromisoformat(m_drift[2])
            if end <= start:
                raise ValueError("empty window")
            media = "text/html; charset=utf-8" if m_drift[3].endswith(".html") else "application/json"
        elif m_skew:
            date.fromisoformat(m_skew[1])
            media = "application/json"
        else:
            raise ValueError("not a report path")
    except ValueError as exc:
        raise ReportNotFound(f"reports/{path}: not a report this page serves ({exc}); it serves "
                             "drift/<start>_<end>/report.html|figures.json, skew/<day>.json and "
                             "validation/<start>_<end>.json") from None
    if m_val:
        report = validation_report(rt, start, end)
        if not report["partitions"]:
            raise ReportNotFound(f"reports/{path}: no partition of {start}..{end} was validated (curated or "
                                 "quarantined)")
        return json.dumps(report, indent=2, default=str).encode(), "application/json"
    uri = rt.lake.uri("reports", *path.split("/"))
    if not rt.lake.exists(uri):
        raise ReportNotFound(f"{uri}: no such report (pruned, or never written)")
    return rt.lake.read_bytes(uri), media


def validation_report(rt: Runtime, start: date, end: date) -> dict[str, Any]:
    """The validation records of the partitions of ``[start, end)``: a curated one's record (its Great
    Expectations results, warnings, normalisations) or a quarantined one's report, per kind and day."""
    from datetime import timedelta

    partitions: list[dict[str, Any]] = []
    day = start
    while day < end:
        for kind in KINDS:
            for status, uri in (("curated", marker_uri(rt.lake, kind, day)),
                                ("quarantined", rt.lake.partition("quarantine", kind, day,
                                                                  suffix=".validation.json"))):
                if rt.lake.exists(uri):
                    partitions.append({"kind": kind, "day": day.isoformat(), "status": status, "record_uri": uri,
                                       "record": rt.lake.read_json(uri)})
                    break
        day += timedelta(days=1)
    return {"window": {"start": start.isoformat(), "end": end.isoformat()}, "partitions": partitions}


# -- rendering ----------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: Any, digits: int = 4) -> str:
    v = _number(x)
    if v is None:
        return "-"
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.{digits}f}"


def line_chart(title: str, x_labels: list[str], lines: dict[str, list[float | None]], *, x_label: str,
               y_label: str, y_range: tuple[float, float] | None = None,
               hlines: dict[str, float] | None = None, width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart: one polyline per series (gaps where a value is None), axes with labels."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    left, right, top, bottom = 60, 150, 30, 50
    pw, ph = width - left - right, height - top - bottom
    values = [v for vs in lines.values() for v in vs if v is not None] + list((hlines or {}).values())
    lo, hi = y_range if y_range else ((min(values), max(values)) if values else (0.0, 1.0))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(x_labels)

    def x(i: int) -> float:
        return left + (pw * i / (n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f"<title>{_e(title)}</title>",
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>',
             f'<text class="x-label" x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{_e(x_label)}</text>',
             f'<text class="y-label" transform="translate(14,{top + ph / 2}) rotate(-90)" '
             f'text-anchor="middle">{_e(y_label)}</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{left}" y2="{y(v):.1f}" stroke="#333"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    step = max(1, math.ceil(n / 6))
    for i in range(0, n, step):
        parts.append(f'<text x="{x(i):.1f}" y="{top + ph + 16}" text-anchor="middle">{_e(x_labels[i])}</text>')
    legend_y = top
    for j, (name, level) in enumerate((hlines or {}).items()):
        parts.append(f'<line x1="{left}" y1="{y(level):.1f}" x2="{left + pw}" y2="{y(level):.1f}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{left + pw + 8}" y="{legend_y + 12 * j + 4}" '
                     f'fill="#777">- - {_e(name)}</text>')
    legend_y += 12 * len(hlines or {}) + 6
    for j, (name, vs) in enumerate(lines.items()):
        colour = colours[j % len(colours)]
        segment: list[str] = []
        segments = []
        for i, v in enumerate(vs):
            if v is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{x(i):.1f},{y(v):.1f}")
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
        if segment:
            segments.append(segment)
        parts.extend(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(s)}"/>'
                     for s in segments if len(s) > 1)
        parts.append(f'<text x="{left + pw + 8}" y="{legend_y + 12 * j + 4}" fill="{colour}">— {_e(name)}</text>')
    if not values:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" fill="#777">'
                     "no monitored windows yet</text>")
    parts.append("</svg>")
    return "".join(parts)


def plots(data: dict[str, Any]) -> dict[str, str]:
    """The two SVG plots of the page: drift share and model quality per monitored window."""
    series = data["series"]
    xs = [p["window"].get("end", "") for p in series]
    champ_auc = _number(((data.get("champion") or {}).get("metrics") or {}).get("roc_auc"))
    return {
        "drift_share": line_chart("Drift share per monitored window", xs,
                                  {"drift share": [p["drift_share"] for p in series]},
                                  x_label="window end (exclusive)", y_label="share of drifted features",
                                  y_range=(0.0, 1.0), hlines={"threshold": data["drift_share_threshold"]}),
        "quality": line_chart("Model quality per monitored window (labels arrived so far)", xs,
                              {"ROC AUC (window)": [p["roc_auc"] for p in series],
                               "ROC AUC (reference)": [p["reference_roc_auc"] for p in series]},
                              x_label="window end (exclusive)", y_label="ROC AUC",
                              hlines={"champion holdout": champ_auc} if champ_auc is not None else None),
        "performance": line_chart("Estimated (CBPE, no labels) vs realised ROC AUC per window, with the lower "
                                  "edges of their calibrated bands", xs,
                                  {"estimated": [p.get("estimated") for p in series],
                                   "realised (labels so far)": [p.get("realised") for p in series],
                                   "estimated band, lower": [p.get("estimated_lower") for p in series],
                                   "realised band, lower": [p.get("realised_lower") for p in series]},
                                  x_label="window end (exclusive)", y_label="ROC AUC"),
    }


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:13px}th{background:#f3f3f3}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20}
h2{margin-top:1.5em;border-bottom:1px solid #ddd}.muted{color:#777}
nav#models ul{display:inline;padding:0}nav#models li{display:inline;margin-right:1em}
nav#models li.refused{display:block}code,pre{white-space:pre-wrap}"""


def model_selector(models: list[dict[str, Any]], current: str) -> str:
    """The page's model selector: a link (``?model=<name>``, a plain GET) per model of :func:`model_choices`, the
    current one marked and not a link, a model whose configuration is refused listed with its error instead."""
    items = []
    for m in models:
        name = m["name"]
        if m.get("error"):
            items.append(f"<li class='refused'><span class='bad'>{_e(name)}</span>: configuration refused "
                         f"<code>{_e(m['error'])}</code></li>")
        elif name == current:
            items.append(f"<li><strong aria-current='page'>{_e(name)}</strong></li>")
        else:
            items.append(f'<li><a href="?model={quote(name, safe="")}">{_e(name)}</a></li>')
    return f"<nav id='models' aria-label='models'>Models: <ul>{''.join(items)}</ul></nav>"


def render_refused(name: str, error: str, models: list[dict[str, Any]]) -> str:
    """The page of a model whose configuration is refused: the selector, and the error that says what to fix."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Model health</title>"
            f"<style>{_CSS}</style></head><body>{model_selector(models, name)}<h1>Model health: {_e(name)}</h1>"
            f"<p class='bad'>The configuration of {_e(name)} is refused; fix it (its DAGs do not load either):</p>"
            f"<pre id='config-error'>{_e(error)}</pre></body></html>")


def render_page(data: dict[str, Any], *, report_base: str = "reports/",
                models: list[dict[str, Any]] | None = None) -> str:
    """The whole page as HTML; report links are ``report_base`` + a report path (relative by default) +
    ``?model=<its model>``; ``models`` (:func:`model_choices`): the selector above the heading (none without)."""
    query = f"?model={quote(str(data['model']), safe='')}"

    def link(path: str | None, text: str) -> str:
        return f'<a href="{_e(report_base + path + query)}">{_e(text)}</a>' if path else ""

    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Model health</title>",
           f"<style>{_CSS}</style></head><body>",
           model_selector(models, data["model"]) if models else "", f"<h1>Model health: {_e(data['model'])}</h1>"]
    champ = data.get("champion")
    out.append("<h2>Champion</h2>")
    if champ is None:
        out.append("<p class='bad'>No champion yet: run the retraining DAG (or <code>closedloop demo</code>).</p>")
    else:
        metrics = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in sorted(champ["metrics"].items()))
        out.append(f"<table><tr><th>version</th><td id='champion-version'>{_e(champ['version'])}</td></tr>"
                   f"<tr><th>registered</th><td>{_e(champ['created'])}</td></tr>"
                   f"<tr><th>training window</th><td>{_e(champ.get('training_window'))}</td></tr>"
                   f"<tr><th>gate decision</th><td>{_e(champ.get('decision'))}: {_e(champ.get('reason'))}</td></tr>"
                   f"<tr><th>MLflow run</th><td>{_e(champ.get('run_id'))} "
                   f"<span class='muted'>({_e(data['tracking_uri'])})</span></td></tr>{metrics}</table>")
    rollout = data.get("rollout")
    out.append("<h2>Rollout</h2>")
    if rollout is None:
        out.append("<p class='muted'>No rollout in progress (<code>rollout.mode</code> in the model's "
                   "configuration; docs/explanation/ROLLOUT.md).</p>")
    else:
        share = f"{rollout['share']:g} of traffic (step {rollout['step']})" if rollout["mode"] == "canary" \
            else "in shadow (no traffic)"
        out.append(f"<table id='rollout'><tr><th>candidate</th><td>version {_e(rollout['version'])}, "
                   f"{_e(rollout['mode'])}</td></tr><tr><th>serves</th><td>{_e(share)}</td></tr>"
                   f"<tr><th>against</th><td>champion version {_e(rollout.get('champion'))}</td></tr>"
                   f"<tr><th>since</th><td>{_e(rollout['started_at'])} (this step since "
                   f"{_e(rollout['step_started_at'])})</td></tr></table>"
                   "<p class='muted'>The rollout DAG ramps, promotes or rolls it back from the same requests' "
                   "labels; its decisions are in the promotion history.</p>")
    out.append("<h2>Promotion history</h2>")
    if data["history"]:
        rows = "".join(f"<tr><td>{_e(h['at'])}</td><td>{_e(h['kind'])}</td><td>{_e(h['from_version'] or '-')}"
                       f" → {_e(h['to_version'])}</td><td>{_e(h['actor'])}</td><td>{_e(h['reason'])}</td></tr>"
                       for h in data["history"])
        out.append(f"<table><tr><th>at (UTC)</th><th>kind</th><th>versions</th><th>by</th><th>reason</th></tr>"
                   f"{rows}</table>")
    else:
        out.append("<p class='muted'>No promotion yet.</p>")
    if data.get("candidates"):
        rows = "".join(f"<tr><td>{_e(v['version'])}</td><td>{_e(v['status'])}</td>"
                       f"<td>{_fmt(v['metrics'].get('roc_auc'))}</td><td>{_e(v.get('reason'))}</td></tr>"
                       for v in data["candidates"])
        out.append("<h3>Other versions</h3><table><tr><th>version</th><th>status</th><th>ROC AUC</th>"
                   f"<th>reason</th></tr>{rows}</table>")

    out.append("<h2>Latest drift</h2>")
    latest = data.get("latest_drift")
    if latest is None:
        out.append("<p class='muted'>No drift report yet: the drift_monitoring DAG writes one per window.</p>")
    else:
        f, d, w = latest["figures"] or {}, latest["decision"] or {}, latest["window"] or {}
        verdict = ("<span class='bad'>drift</span>" if d.get("drift") else
                   "<span class='ok'>no drift</span>" if d.get("judged") else "not judged")
        q = f.get("quality") or {}
        t = latest.get("thresholds") or {}
        weights = t.get("weights") or {}

        def role(name: str) -> str:
            if name in weights:
                return f"in the decision (weight {weights[name]:.3f})"
            return "reported only" if t.get("mode") == "calibrated" else "fixed rules"

        per = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v.get('stattest'))}</td><td>{_fmt(v.get('score'))}</td>"
                      f"<td>{_fmt(v.get('threshold'))}</td><td>{'yes' if v.get('drifted') else 'no'}</td>"
                      f"<td>{_e(role(k))}</td></tr>"
                      for k, v in sorted((f.get("per_feature") or {}).items()))
        perf = f.get("performance") or {}
        eb, rb = perf.get("estimated_band") or {}, perf.get("realised_band") or {}
        agg, pk = t.get("aggregate") or {}, t.get("peak") or {}
        used = (f"<tr><th>thresholds used</th><td id='thresholds-mode'>{_e(t.get('mode', 'fixed'))}: "
                f"{_e(t.get('why', 'the policy'))}</td></tr>"
                f"<tr><th>importance-weighted input drift</th><td>{_fmt(agg.get('value'))} against "
                f"{_fmt(agg.get('threshold'))}</td></tr>"
                + (f"<tr><th>input peak ({_e(', '.join(pk.get('features') or []))})</th><td id='input-peak'>"
                   f"{_e(pk.get('feature') or '-')} {_fmt(pk.get('value'))} against {_fmt(pk.get('threshold'))}"
                   "</td></tr>" if pk else "")
                + f"<tr><th>prediction drift (threshold)</th><td>{_fmt((f.get('prediction') or {}).get('threshold'))}"
                "</td></tr>"
                f"<tr><th>estimated ROC AUC (CBPE) / band</th><td id='estimated-performance'>"
                f"{_fmt(perf.get('estimated'))} / [{_fmt(eb.get('lower'))}, {_fmt(eb.get('upper'))}]</td></tr>"
                f"<tr><th>realised ROC AUC / band</th><td>{_fmt(perf.get('realised'))} on "
                f"{_e(perf.get('labelled_rows'))} labelled rows / [{_fmt(rb.get('lower'))}, "
                f"{_fmt(rb.get('upper'))}]</td></tr>")
        out.append(f"<p>Window {_e(w.get('start'))} .. {_e(w.get('end'))} (end exclusive): {verdict}. "
                   f"{link(latest['html_path'], 'Evidently report')} · {link(latest['json_path'], 'figures (JSON)')}"
                   "</p><table>"
                   f"<tr><th>drift share</th><td id='drift-share'>{_fmt(f.get('drift_share'))}</td></tr>"
                   f"<tr><th>drifted features</th><td>{_e(', '.join(f.get('drifted_features') or []) or '-')}</td></tr>"
                   f"<tr><th>rows (reference / current / sampled)</th><td>{_e(f.get('reference_rows'))} / "
                   f"{_e(f.get('current_rows'))} / {_e(f.get('sampled_rows'))}</td></tr>"
                   f"<tr><th>prediction drift score</th><td>{_fmt((f.get('prediction') or {}).get('score'))}</td></tr>"
                   f"<tr><th>ROC AUC (window / reference)</th><td>{_fmt(q.get('roc_auc'))} / "
                   f"{_fmt(q.get('reference_roc_auc'))}</td></tr>"
                   f"{used}<tr><th>decision</th><td>{_e('; '.join(d.get('reasons') or []))}</td></tr></table>"
                   "<table><tr><th>feature</th><th>test</th><th>statistic</th><th>threshold (its band's edge)</th>"
                   f"<th>past it</th><th>role</th></tr>{per}</table>")
    out.append("<h2>Over time</h2>")
    svgs = plots(data)
    out.append(f"<div>{svgs['drift_share']}</div><div>{svgs['quality']}</div><div>{svgs['performance']}</div>")
    if data.get("drift_reports"):
        items = "".join(f"<li>{_e(r['window'].get('start'))} .. {_e(r['window'].get('end'))}"
                        f"{' (drift)' if r['drift'] else ''}: {link(r['html_path'], 'report')} · "
                        f"{link(r['json_path'], 'figures')}</li>" for r in data["drift_reports"])
        out.append(f"<h3>Drift reports kept in the lake</h3><ul>{items}</ul>")

    out.append("<h2>Training/serving skew</h2>")
    skew = data.get("skew")
    if skew is None:
        out.append("<p class='muted'>No skew report yet: the skew_check DAG writes one per served day.</p>")
    else:
        verdict = "<span class='ok'>passed</span>" if skew.get("passed") else "<span class='bad'>failed</span>"
        out.append(f"<p>Day {_e(skew.get('day'))}: {verdict}, {_e(skew.get('sampled'))} of "
                   f"{_e(skew.get('served_rows'))} served rows compared, mismatch share "
                   f"{_fmt(skew.get('mismatch_share'))} (features {_fmt(skew.get('feature_mismatch_share'))}, "
                   f"scores {_fmt(skew.get('score_mismatch_share'))}). {_e('; '.join(skew.get('reasons') or []))} "
                   f"{link(skew['json_path'], 'report (JSON)')}</p>")
    out.append("</body></html>")
    return "".join(out)


# -- the loop's state for Prometheus (closedloop.adapters.exporter) --------------------------------------------------
def _day_start(day: str | None) -> float | None:
    """The UTC midnight that starts ``day`` (ISO date) as a Unix timestamp, or None."""
    from datetime import UTC, datetime

    try:
        return datetime.fromisoformat(str(day)).replace(tzinfo=UTC).timestamp() if day else None
    except ValueError:
        return None


def _written_at(entry: dict[str, Any]) -> float | None:
    """When a listed lake object was last written (Unix seconds), where the filesystem says."""
    from datetime import datetime

    stamp = entry.get("mtime") or entry.get("LastModified") or entry.get("updated")
    if isinstance(stamp, int | float):
        return float(stamp)
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _partitions(rt: Runtime, *parts: str, suffix: str) -> tuple[list[date], float | None]:
    """The days of the ``<day><suffix>`` files under ``parts`` (sorted) and the latest time one was written:
    one listing, no file read."""
    base = rt.lake.uri(*parts)
    if not rt.lake.exists(base):
        return [], None
    days, written = [], []
    for entry in rt.lake.fs.ls(rt.lake.local_path(base), detail=True):
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not name.endswith(suffix):
            continue
        try:
            days.append(date.fromisoformat(name[: -len(suffix)]))
        except ValueError:
            continue  # not a partition of ours
        if (at := _written_at(entry)) is not None:
            written.append(at)
    return sorted(days), max(written, default=None)


def loop_state(rt: Runtime, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The loop's state as the Prometheus exporter (:mod:`closedloop.adapters.exporter`) exposes it, JSON-safe.

    Built on :func:`gather` (``data``, gathered here when not given), so the exporter and the page show the
    same figures: the champion's version, the latest drift window's share, threshold and decision, the latest
    estimated and realised ROC AUC with their bands' lower edges (from :func:`gather`'s series: MLflow's
    monitoring runs, else the lake's reports; realised performance lags by the labels' delay, so its window
    may be older than the estimate's). From the lake, by listing only: per kind, the newest curated day and
    when the last validation marker was written (an ingest run that curated a partition), the last
    quarantine report's time and the count of quarantined partitions (:func:`closedloop.stages.quarantine.
    quarantined_days`). The rollout in progress (:func:`closedloop.stages.registry.rollout_state`): the
    candidate's version on the canary arm and its traffic share (a shadow challenger's share is 0: it answers
    nothing); 0 and 0 without a rollout.
    """
    data = gather(rt) if data is None else data
    champion = data.get("champion") or {}
    rollout = data.get("rollout")
    latest = data.get("latest_drift") or {}
    decision = latest.get("decision") or {}
    figures = latest.get("figures") or {}

    def newest(field: str) -> dict[str, Any] | None:
        point = next((p for p in reversed(data.get("series") or []) if p.get(field) is not None), None)
        if point is None:
            return None
        return {"roc_auc": point[field], "band_lower": point.get(f"{field}_lower"),
                "window_end": _day_start((point.get("window") or {}).get("end"))}

    ingest = {}
    for kind in KINDS:
        curated, curated_at = _partitions(rt, "curated", "_validation", kind, suffix=".json")
        _, quarantined_at = _partitions(rt, "quarantine", kind, suffix=REPORT_SUFFIX)
        ingest[kind] = {"newest_day": _day_start(curated[-1].isoformat()) if curated else None,
                        "last_curated_at": curated_at,
                        "last_run_at": max((t for t in (curated_at, quarantined_at) if t is not None), default=None),
                        "quarantined": len(quarantined_days(rt.lake, kind))}
    return {
        "model": data["model"],
        "versions": {"champion": int(champion["version"]) if champion.get("version") else 0,
                     "canary": int(rollout["version"]) if rollout else 0},
        "canary_share": float(rollout["share"]) if rollout else 0.0,
        "drift": None if not latest else {
            "share": _number(figures.get("drift_share")), "share_threshold": _number(data.get("drift_share_threshold")),
            "decision": "retrain" if decision.get("drift") else "no_drift" if decision.get("judged") else "not_judged",
            "window_end": _day_start((latest.get("window") or {}).get("end"))},
        "performance": {kind: p for kind, field in (("estimated", "estimated"), ("realised", "realised"))
                        if (p := newest(field)) is not None},
        "ingest": ingest,
    }
