"""Writes the Grafana dashboard of docs/monitoring.md from the panel list below.

    python scripts/build_dashboard.py          # rewrites deploy/monitoring/grafana/dashboards/
    python scripts/build_dashboard.py --check  # exit 1 when the committed JSON is out of date

The panels are data (a title, a unit, PromQL queries) and the layout, ids and
JSON boilerplate are computed, so a panel is added or changed in one line and
the committed JSON stays the reviewed output of this file (a test runs
`--check`). Plain dicts: Grafana's JSON model is stable, and this keeps the
project free of a dashboard SDK dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "enriched-contacts.json"

#: The uid of the data source that deploy/monitoring/grafana/provisioning/ creates.
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
UID = "enriched-contacts"

# Selectors the template variables fill in: the service's replicas of one job,
# and the redis_exporter job for Redis's own figures.
SVC = 'job=~"$job", instance=~"$instance"'
CONTACTS = f'{SVC}, route="/contacts"'
JOB = 'job=~"$job"'
REDIS = 'job=~"$redis_job"'
RATE = "$__rate_interval"


@dataclass
class Query:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    queries: list[Query]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    stack: bool = False
    width: int = 8
    max: float | None = None


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def quantiles(selector: str, metric: str, by: str = "") -> list[Query]:
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        q(
            f"histogram_quantile({quantile}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{prefix}p{int(quantile * 100)}",
        )
        for quantile in (0.5, 0.95, 0.99)
    ]


ROWS = [
    Row(
        "GET /contacts: rate, errors, duration",
        [
            Panel(
                "Requests by status",
                [
                    q(
                        f"sum by (status) (rate(http_requests_total{{{CONTACTS}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "5xx ratio (5 min)",
                [q(f"job:contacts_errors:ratio_rate5m{{{JOB}}}", "{{job}}")],
                unit="percentunit",
                description="Share of /contacts answers that were 5xx: 502/504 from the WhatsApp"
                " API, 503 shed. Alert: ContactsHighErrorRatio.",
            ),
            Panel(
                "Duration p50 / p95 / p99",
                quantiles(CONTACTS, "http_request_duration_seconds"),
                unit="s",
            ),
        ],
    ),
    Row(
        "Service level objectives",
        [
            Panel(
                "Objectives",
                [q("slo:objective:ratio", "{{slo}}")],
                unit="percentunit",
                kind="stat",
                description="rules/slo.yml: availability (not 5xx) and latency (under 250 ms).",
            ),
            Panel(
                "Good share, last hour",
                [q(f"1 - job_slo:sli_error:ratio_rate1h{{{JOB}}}", "{{slo}}")],
                unit="percentunit",
            ),
            Panel(
                "Error budget burn rate (1 h, 6 h)",
                [
                    q(
                        f"job_slo:sli_error:ratio_rate1h{{{JOB}}} / on (slo) group_left ()"
                        " (1 - slo:objective:ratio)",
                        "{{slo}} 1h",
                    ),
                    q(
                        f"job_slo:sli_error:ratio_rate6h{{{JOB}}} / on (slo) group_left ()"
                        " (1 - slo:objective:ratio)",
                        "{{slo}} 6h",
                    ),
                ],
                description="1 spends the 30-day budget in exactly 30 days; the fast-burn alerts"
                " page at 14.4 (1 h) and 6 (6 h).",
            ),
        ],
    ),
    Row(
        "Enrichment and cache",
        [
            Panel(
                "Answers by enrichment",
                [
                    q(
                        f"sum by (state) (rate(contacts_enrichment_total{{{SVC}}}[{RATE}]))",
                        "{{state}}",
                    )
                ],
                unit="reqps",
                stack=True,
                description="complete; partial: a CRM batch failed, entities null; stale: served"
                " past their TTL because the CRM failed.",
            ),
            Panel(
                "Partial and stale share (5 min)",
                [
                    q(
                        f'job_state:contacts_enrichment:ratio_rate5m{{{JOB}, state!="complete"}}',
                        "{{state}}",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Hit ratio by entity (5 min)",
                [q(f"job_entity:cache_hit:ratio_rate5m{{{JOB}}}", "{{entity}}")],
                unit="percentunit",
                max=1,
            ),
            Panel(
                "Hits and misses",
                [
                    q(
                        f"sum by (entity) (rate(cache_hits_total{{{SVC}}}[{RATE}]))",
                        "{{entity}} hits",
                    ),
                    q(
                        f"sum by (entity) (rate(cache_misses_total{{{SVC}}}[{RATE}]))",
                        "{{entity}} misses",
                    ),
                ],
                unit="ops",
            ),
            Panel(
                "Stale entities served",
                [
                    q(
                        f"sum by (entity) (rate(cache_stale_served_total{{{SVC}}}[{RATE}]))",
                        "{{entity}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Admin invalidations",
                [
                    q(
                        f"sum by (scope) (increase(cache_invalidations_total{{{SVC}}}[{RATE}]))",
                        "{{scope}}",
                    )
                ],
                unit="short",
            ),
        ],
    ),
    Row(
        "Redis, as the service sees it",
        [
            Panel(
                "Round trips by operation",
                [
                    q(
                        f"sum by (op) (rate(redis_round_trips_total{{{SVC}}}[{RATE}]))",
                        "{{op}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            Panel(
                "Redis errors",
                [
                    q(
                        f"sum by (instance) (rate(redis_errors_total{{{SVC}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Circuit breaker open / last call ok",
                [
                    q(f"max by (instance) (redis_circuit_open{{{SVC}}})", "{{instance}} open"),
                    q(f"min by (instance) (redis_up{{{SVC}}})", "{{instance}} up"),
                ],
                max=1,
                description="open = 1: the replica skips Redis (ContactsRedisCircuitOpen);"
                " up = 0: its last Redis call failed.",
            ),
        ],
    ),
    Row(
        "CRM and WhatsApp API",
        [
            Panel(
                "CRM calls by outcome",
                [
                    q(
                        "sum by (api, outcome) (rate(upstream_requests_total"
                        f'{{{SVC}, api=~"crm_.*"}}[{RATE}]))',
                        "{{api}} {{outcome}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "CRM failure ratio (5 min)",
                [q(f"job:crm_requests_failed:ratio_rate5m{{{JOB}}}", "{{job}}")],
                unit="percentunit",
            ),
            Panel(
                "CRM ids fetched",
                [
                    q(
                        f"sum by (entity) (rate(crm_ids_fetched_total{{{SVC}}}[{RATE}]))",
                        "{{entity}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Upstream call duration p50 / p95 / p99",
                quantiles(SVC, "upstream_request_duration_seconds", by="api"),
                unit="s",
            ),
            Panel(
                "CRM batch size p50 / p95 / p99",
                quantiles(SVC, "crm_batch_size", by="entity"),
                unit="short",
            ),
            Panel(
                "WhatsApp API calls by outcome",
                [
                    q(
                        f'sum by (outcome) (rate(upstream_requests_total{{{SVC}, api="whatsapp"}}'
                        f"[{RATE}]))",
                        "{{outcome}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
        ],
    ),
    Row(
        "Leases, refresh-ahead and admission",
        [
            Panel(
                "Lease round trips",
                [
                    q(
                        f'sum by (op) (rate(redis_round_trips_total{{{SVC}, op=~"lease|get_pttl"}}'
                        f"[{RATE}]))",
                        "{{op}}",
                    )
                ],
                unit="ops",
                description="lease: the leases (a field each in the instance's lease hash)"
                " of the ids a replica is about to fetch; get_pttl:"
                " reads with TTLs (waiting on another replica's lease, refresh-ahead, stale).",
            ),
            Panel(
                "Refresh-ahead",
                [
                    q(
                        f"sum by (entity) (rate(cache_refresh_ahead_total{{{SVC}}}[{RATE}]))",
                        "{{entity}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Admission: active and queued",
                [
                    q(f"sum (admission_active{{{SVC}}})", "active"),
                    q(f"sum (admission_queued{{{SVC}}})", "queued"),
                ],
                unit="short",
            ),
            Panel(
                "Admission: waits and sheds",
                [
                    q(f"sum (rate(admission_waits_total{{{SVC}}}[{RATE}]))", "waited"),
                    q(f"sum (rate(admission_shed_total{{{SVC}}}[{RATE}]))", "shed (503)"),
                ],
                unit="reqps",
            ),
            Panel(
                "Shed ratio (5 min)",
                [q(f"job:admission_shed:ratio_rate5m{{{JOB}}}", "{{job}}")],
                unit="percentunit",
            ),
        ],
    ),
    Row(
        "Per replica",
        [
            Panel(
                "Requests by replica",
                [
                    q(
                        f"sum by (instance) (rate(http_requests_total{{{CONTACTS}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "p99 by replica",
                [
                    q(
                        "histogram_quantile(0.99, sum by (instance, le)"
                        f" (rate(http_request_duration_seconds_bucket{{{CONTACTS}}}[{RATE}])))",
                        "{{instance}}",
                    )
                ],
                unit="s",
            ),
            Panel(
                "Hit ratio by replica",
                [
                    q(
                        f"sum by (instance) (rate(cache_hits_total{{{SVC}}}[{RATE}]))"
                        f" / (sum by (instance) (rate(cache_hits_total{{{SVC}}}[{RATE}]))"
                        f" + sum by (instance) (rate(cache_misses_total{{{SVC}}}[{RATE}])))",
                        "{{instance}}",
                    )
                ],
                unit="percentunit",
                max=1,
            ),
            Panel(
                "Scraped (up)",
                [q(f"up{{{SVC}}}", "{{instance}}")],
                max=1,
            ),
        ],
    ),
    Row(
        "Redis server (redis_exporter)",
        [
            Panel(
                "Memory used / max",
                [
                    q(f"redis_memory_used_bytes{{{REDIS}}}", "used"),
                    q(f"redis_memory_max_bytes{{{REDIS}}}", "maxmemory"),
                ],
                unit="bytes",
            ),
            Panel(
                "Evicted and expired keys",
                [
                    q(f"rate(redis_evicted_keys_total{{{REDIS}}}[{RATE}])", "evicted"),
                    q(f"rate(redis_expired_keys_total{{{REDIS}}}[{RATE}])", "expired"),
                ],
                unit="ops",
            ),
            Panel(
                "Connected clients",
                [q(f"redis_connected_clients{{{REDIS}}}", "{{instance}}")],
                unit="short",
            ),
            Panel(
                "Commands processed",
                [q(f"rate(redis_commands_processed_total{{{REDIS}}}[{RATE}])", "{{instance}}")],
                unit="ops",
            ),
            Panel(
                "Keys",
                [q(f"sum by (instance) (redis_db_keys{{{REDIS}}})", "{{instance}}")],
                unit="short",
            ),
            Panel(
                "Redis up (exporter)",
                [q(f"redis_up{{{REDIS}}}", "{{instance}}")],
                max=1,
            ),
        ],
    ),
]


def _variable(name: str, label: str, query: str, *, all_value: str | None = None) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "current": {},
        "options": [],
        "hide": 0,
        "multi": all_value is not None,
        "includeAll": all_value is not None,
    }
    if all_value is not None:
        variable["allValue"] = all_value
    return variable


def _panel(panel: Panel, panel_id: int, x: int, y: int, height: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "min": 0}
    if panel.max is not None:
        defaults["max"] = panel.max
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
            "colorMode": "none",
            "graphMode": "none",
        }
    else:
        defaults["custom"] = {
            "fillOpacity": 20 if panel.stack else 5,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "showPoints": "never",
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
            }
            for n, query in enumerate(panel.queries)
        ],
    }


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 39, Grafana 10.x and 11.x)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    height = 8
    for row in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + height
            panels.append(_panel(panel, next_id, x, y, height))
            next_id += 1
            x += panel.width
        y += height
    return {
        "uid": UID,
        "title": "Enriched contacts",
        "description": "The enriched-contacts service: docs/monitoring.md",
        "tags": ["enriched-contacts"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {
            "list": [
                {
                    "name": "Alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertstate="firing", alertname=~"Contacts.*"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{job}} {{instance}}",
                    "step": "60s",
                }
            ]
        },
        "templating": {
            "list": [
                _variable(
                    "job", "Job", 'label_values(http_requests_total{route="/contacts"}, job)'
                ),
                _variable(
                    "instance",
                    "Replica",
                    'label_values(http_requests_total{job=~"$job"}, instance)',
                    all_value=".+",
                ),
                _variable("redis_job", "Redis job", "label_values(redis_exporter_build_info, job)"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
