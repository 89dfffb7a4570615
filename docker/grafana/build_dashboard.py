"""Writes `dashboards/anytime.json`, the Grafana dashboard, from the panel list below.

Run `python docker/grafana/build_dashboard.py` after changing a panel; a test checks that the
committed JSON is what this script writes and that every panel's query returns data from a
real Prometheus scraping a real server. Uses only the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "anytime-prometheus"}
SEL = '{instance=~"$instance", model=~"$model"}'
INFO_SEL = '{instance=~"$instance", name=~"$model"}'  # anytime_model_info names the model `name'
RATE = "$__rate_interval"

# (title, kind, unit, [(legend, expr)], description)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], str]] = [
    (
        "Per-exit hit rate",
        "stacked",
        "percentunit",
        [
            (
                "exit {{exit}}",
                f"sum by (exit) (rate(anytime_exits_total{SEL}[{RATE}])) / ignoring(exit) group_left "
                f"sum(rate(anytime_exits_total{SEL}[{RATE}]))",
            )
        ],
        "Share of answers given by each exit (stacked to 100 %).",
    ),
    (
        "Exit distribution",
        "bars",
        "short",
        [
            (
                "exit {{exit}}",
                f"sum by (exit) (increase(anytime_exits_total{SEL}[$__range]))",
            )
        ],
        "Answers per exit over the dashboard's time range.",
    ),
    (
        "Request latency",
        "lines",
        "s",
        [
            (
                f"p{q}",
                f"histogram_quantile(0.{q}, sum by (le) (rate(anytime_request_latency_seconds_bucket{SEL}[{RATE}])))",
            )
            for q in (50, 95, 99)
        ],
        "Server-side latency of /classify, from receipt to answer.",
    ),
    (
        "Latency per exit (p95)",
        "lines",
        "s",
        [
            (
                "exit {{exit}}",
                f"histogram_quantile(0.95, sum by (le, exit) (rate(anytime_exit_latency_seconds_bucket{SEL}[{RATE}])))",
            )
        ],
        "95th percentile latency of the requests each exit answered.",
    ),
    (
        "Stage time (p95)",
        "lines",
        "s",
        [
            (
                "{{model}} stage {{stage}}",
                "histogram_quantile(0.95, sum by (le, model, stage) "
                f"(rate(anytime_stage_seconds_bucket{SEL}[{RATE}])))",
            )
        ],
        "Time of one stage and its exit head for a whole batch, per model.",
    ),
    (
        "Deadlines",
        "stacked",
        "reqps",
        [
            (
                "{{outcome}}",
                f"sum by (outcome) (rate(anytime_deadline_total{SEL}[{RATE}]))",
            )
        ],
        "Requests with a deadline: met, missed (answered late) or rejected (504 before any compute).",
    ),
    (
        "Exit reasons",
        "stacked",
        "reqps",
        [
            (
                "{{reason}}",
                f"sum by (reason) (rate(anytime_exits_total{SEL}[{RATE}]))",
            )
        ],
        "Why samples stopped: confidence, deadline, max_exit or final.",
    ),
    (
        "Throughput by status",
        "stacked",
        "reqps",
        [
            (
                "{{status}}",
                f"sum by (status) (rate(anytime_requests_total{SEL}[{RATE}]))",
            )
        ],
        "Requests per second by HTTP status.",
    ),
    (
        "Queue depth",
        "lines",
        "short",
        [
            (
                "{{model}}",
                f"sum by (model) (anytime_queue_depth{SEL})",
            )
        ],
        "Requests waiting for each model's workers, over all replicas (a replica answers 503 when its queue is full).",
    ),
    (
        "Batch size",
        "lines",
        "short",
        [
            (
                "mean",
                f"sum(rate(anytime_batch_size_sum{SEL}[{RATE}])) / sum(rate(anytime_batch_size_count{SEL}[{RATE}]))",
            )
        ],
        "Mean number of requests the engine ran through the stages together.",
    ),
    (
        "Exit agreement (drift guard)",
        "lines",
        "percentunit",
        [
            (
                "exit {{exit}} measured",
                f"sum by (exit) (rate(anytime_shadow_agreements_total{SEL}[{RATE}])) / "
                f"sum by (exit) (rate(anytime_shadow_samples_total{SEL}[{RATE}]))",
            ),
            ("exit {{exit}} expected", f"max by (exit) (anytime_exit_expected_agreement{SEL})"),
        ],
        "How often shadow-checked early answers agree with the final exit, against the validation figure. "
        "A measured line well below its expected one means the traffic drifted (alert AnytimeExitDisagreement).",
    ),
    (
        "Thresholds in force",
        "lines",
        "short",
        [
            (
                "{{model}} exit {{exit}}",
                f"max by (model, exit) (anytime_threshold{SEL})",
            )
        ],
        "Per exit: the artifact's threshold, or the drift guard's when ANYTIME_ADAPT is on.",
    ),
    (
        "In flight per replica",
        "lines",
        "short",
        [
            (
                "{{instance}}",
                'anytime_inflight{instance=~"$instance"}',
            )
        ],
        "Requests each replica has admitted and not yet answered: what the autoscaler scales on (deploy/k8s).",
    ),
    (
        "Throughput per replica",
        "stacked",
        "reqps",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(anytime_requests_total{SEL}[{RATE}]))",
            )
        ],
        "Requests per second each replica answered; an even split means the balancer spreads the load.",
    ),
    (
        "Event-loop lag",
        "lines",
        "s",
        [
            (
                "{{instance}}",
                'max by (instance) (anytime_event_loop_lag_seconds{instance=~"$instance"})',
            )
        ],
        "How far behind its timers each replica's event loop runs: what a request waits before it is read, "
        "and what its budget loses before admission (docs/server.md, Deadlines).",
    ),
    (
        "Resends held",
        "lines",
        "reqps",
        [
            (
                "{{instance}}",
                f'sum by (instance) (rate(anytime_resend_holds_total{{instance=~"$instance"}}[{RATE}]))',
            )
        ],
        "Refusals held per second because the client resent at once after refusals (ANYTIME_RESEND_HOLD_MS): "
        "a retry loop without backoff.",
    ),
    (
        "Balancer",
        "lines",
        "short",
        [
            ("replicas in the pool", 'sum(haproxy_backend_active_servers{proxy="api"})'),
            ("retries/s", f'sum(rate(haproxy_backend_retry_warnings_total{{proxy="api"}}[{RATE}]))'),
            ("redispatches/s", f'sum(rate(haproxy_backend_redispatch_warnings_total{{proxy="api"}}[{RATE}]))'),
        ],
        "HAProxy (make cluster, docker compose): replicas passing their /readyz check, and requests it "
        "sent again to another replica after a failed connection, no answer or a 503. Empty with one server.",
    ),
    (
        "Model",
        "table",
        "short",
        [
            (
                "",
                f"anytime_model_info{INFO_SEL}",
            )
        ],
        "The models (name, version) and devices each instance serves: one row per served version.",
    ),
]


def _panel(i: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]], description: str) -> dict:
    width = 24 if kind == "table" else 12
    grid = {"h": 6 if kind == "table" else 8, "w": width, "x": (i % 2) * 12, "y": (i // 2) * 8}
    panel: dict = {
        "id": i + 1,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": [
            {
                "refId": chr(65 + j),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                **({"format": "table", "instant": True} if kind == "table" else {}),
            }
            for j, (legend, expr) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }
    if kind == "table":
        panel["type"] = "table"
        panel["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    elif kind == "bars":
        panel["type"] = "barchart"
        panel["targets"][0] |= {"format": "table", "instant": True}
    else:
        panel["type"] = "timeseries"
        custom = {
            "fillOpacity": 60 if kind == "stacked" else 10,
            "stacking": {"mode": "normal" if kind == "stacked" else "none"},
        }
        panel["fieldConfig"]["defaults"]["custom"] = custom
    return panel


def _variable(name: str, label: str, info_label: str) -> dict:
    """A multi-value template variable over one label of anytime_model_info, "All" by default."""
    query = f"label_values(anytime_model_info, {info_label})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def build() -> dict:
    """The whole dashboard as a dict."""
    return {
        "uid": "anytime",
        "title": "Anytime inference",
        "tags": ["anytime"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [_variable("instance", "Instance", "instance"), _variable("model", "Model", "name")]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def main() -> None:
    out = Path(__file__).resolve().parent / "dashboards" / "anytime.json"
    out.write_text(json.dumps(build(), indent=2) + "\n")


if __name__ == "__main__":
    main()
