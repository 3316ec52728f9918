"""Reading Prometheus metrics in tests: a registry's or an endpoint's samples by name, and
the metric names a Grafana dashboard's queries use."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "ops" / "grafana" / "dashboards"
_METRIC = re.compile(r"\b(v2g_[a-z0-9_]+)")

# The series a family of each type exposes, even before its first sample.
_SERIES_OF = {
    "counter": ("", "_total"),
    "histogram": ("", "_bucket", "_count", "_sum"),
}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """Exposition text -> {sample name: [(labels, value), ...]}; every family's name too
    (a family with no sample yet, e.g. refusals before the first, maps to [])."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for suffix in _SERIES_OF.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, [])
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def scrape_registry(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of ``name`` with ``labels`` (others ignored); None if absent."""
    for have, v in samples.get(name, []):
        if all(have.get(k) == x for k, x in labels.items()):
            return v
    return None


def dashboard_queries() -> list[tuple[str, str]]:
    """(dashboard file, PromQL expression) of every panel target under ops/grafana."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The platform metric names (``v2g_*``) a PromQL expression selects."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_METRIC.findall(without_strings))
