"""What the benchmarks share: the loopback broker they use, the row of a results table,
the table printed, and the JSON written with the provenance of the run.

A run's provenance (:func:`provenance`) says what was measured and on what: the git
commit and whether the tree had changes, the versions of Python, the libraries on the
measured paths and Mosquitto, the CPU, and the machine's load average when the run began
and when it ended (the machine is shared: a figure taken under load 3 on 2 cores is not
the figure of an idle one). Every result file carries it, and every table printed opens
with one line of it::

    started = start()
    rows = measure()
    stamp = provenance(started)
    print_table(rows, stamp)
    write_results(rows, out, stamp)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The broker under test: the shared one, or another on loopback (V2G_BENCH_BROKER_PORT; the
# service's own connections then follow V2G_BROKER_URL, which Settings reads).
HOST, PORT = "127.0.0.1", int(os.environ.get("V2G_BENCH_BROKER_PORT", "1883"))
T0 = 1_795_651_200.0 + 21 * 3600  # 2026-11-26 21:00 UTC, most home cars plugged in

Row = dict[str, Any]

# Whose versions a result depends on: the measured paths' libraries (pydantic decodes,
# aiomqtt/paho, mqtt5 and redis carry, numpy computes, scipy's HiGHS schedules, ocpp and
# websockets carry OCPP).
PACKAGES = (
    "numpy",
    "pydantic",
    "aiomqtt",
    "paho-mqtt",
    "mqtt5",
    "redis",
    "scipy",
    "highspy",
    "orjson",
    "ocpp",
    "websockets",
)
PROVENANCE_KEYS = frozenset(
    {
        "git_sha",
        "git_dirty",
        "versions",
        "cpu_model",
        "cpu_count",
        "load_start",
        "load_end",
        "started",
        "finished",
        "command",
    }
)


# -- the table's rows ------------------------------------------------------------------
def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs, in seconds: the least disturbed by neighbours."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def row(
    metric: str,
    n: int,
    value: float,
    ref: float | None = None,
    unit: str = "",
    ref_name: str = "",
    target: float | None = None,
    lower_is_better: bool = False,
    on_ratio: bool = False,
) -> Row:
    """One table row; ``target`` applies to the value, or with ``on_ratio`` to value/ref
    (then marked ``"target_on": "ratio"``, and printed with an x)."""
    ratio = (value / ref) if ref else None
    judged = ratio if on_ratio else value
    ok = (
        None
        if target is None or judged is None
        else (judged <= target if lower_is_better else judged >= target)
    )
    return {
        "metric": metric,
        "vehicles": n,
        "value": round(value, 2),
        "unit": unit,
        "reference": None if ref is None else round(ref, 2),
        "reference_is": ref_name,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        **({"target_on": "ratio"} if on_ratio else {}),
        "pass": ok,
    }


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def print_table(rows: Sequence[Row], stamp: dict[str, Any] | None = None) -> None:
    """The rows as one aligned table; with ``stamp`` (see :func:`provenance`), under a line
    saying which commit ran and under what load. A ``bench`` column when rows have one."""
    cols: list[tuple[str, Any]] = [
        ("metric", lambda r: r["metric"]),
        ("N", lambda r: _fmt(r.get("vehicles")) if r.get("vehicles") else ""),
        ("value", lambda r: _fmt(r["value"])),
        ("unit", lambda r: r.get("unit", "")),
        ("reference", lambda r: _fmt(r["reference"])),
        ("ratio", lambda r: _fmt(r["ratio"])),
        ("target", lambda r: _fmt(r["target"]) + ("x" if r.get("target_on") == "ratio" else "")),
        ("pass", lambda r: "" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")),
        ("reference is", lambda r: r.get("reference_is", "")),
    ]
    if any(r.get("bench") for r in rows):
        cols.insert(0, ("bench", lambda r: r.get("bench", "")))
    cells = [[str(f(r)) for _, f in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    right = {"N", "value", "reference", "ratio", "target"}

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if h in right else v.ljust(w)
            for v, w, (h, _) in zip(values, widths, cols, strict=True)
        ).rstrip()

    if stamp is not None:
        print(header(stamp))
    print(line([h for h, _ in cols]))
    print("-" * sum(widths) + "-" * 2 * (len(cols) - 1))
    for c in cells:
        print(line(c))


def write_results(
    rows: Sequence[Any], out: Path | str, stamp: dict[str, Any], **extra: Any
) -> None:
    """Write a bench's rows (and ``extra`` fields) as JSON, with the run's provenance."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"when": stamp["finished"], "provenance": stamp, **extra, "rows": list(rows)}
    path.write_text(json.dumps(doc, indent=2))
    print(f"written {path}")


# -- provenance ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Started:
    """When a run began and the machine's load then (1, 5, 15 min averages)."""

    at: str
    load: tuple[float, float, float]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def start() -> Started:
    """Mark the start of a run: call it before measuring, pass it to :func:`provenance`."""
    return Started(_now(), _load())


def _run(argv: list[str], ok: tuple[int, ...] = (0,)) -> str | None:
    """A command's stdout, or None if it cannot be run or exits with another status."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10.0, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode in ok else None


def git_state() -> tuple[str, bool | None]:
    """The checked-out commit (40 hex digits, or "unknown" outside a git checkout) and
    whether tracked or new files differ from it (None when unknown)."""
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha is None or len(sha.strip()) != 40:
        return "unknown", None
    status = _run(["git", "status", "--porcelain"])
    return sha.strip(), None if status is None else bool(status.strip())


def mosquitto_version() -> str | None:
    """The first line of ``mosquitto -h`` ("mosquitto version 2.0.11"): its version."""
    sbin = f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin:/sbin"
    binary = shutil.which("mosquitto", path=sbin)
    if binary is None:
        return None
    out = _run([binary, "-h"], ok=(0, 3))  # 2.x exits with status 3 after its usage
    first = out.splitlines()[0].strip() if out else ""
    return first.removeprefix("mosquitto version ").strip() or None


def versions() -> dict[str, str | None]:
    """Python's version, each of PACKAGES' installed version (None if absent), Mosquitto's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["mosquitto"] = mosquitto_version()
    return found


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def provenance(started: Started) -> dict[str, Any]:
    """The run's provenance: every key of PROVENANCE_KEYS, the load now as ``load_end``."""
    sha, dirty = git_state()
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "versions": versions(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_start": list(started.load),
        "load_end": list(_load()),
        "started": started.at,
        "finished": _now(),
        "command": " ".join([Path(sys.executable).name, *sys.orig_argv[1:]]),
        "platform": platform.platform(),
    }


def header(stamp: dict[str, Any]) -> str:
    """One line of the provenance, to print above a table."""
    sha = stamp["git_sha"][:12] + (" (uncommitted changes)" if stamp["git_dirty"] else "")
    load = f"{stamp['load_start'][0]:.2f} -> {stamp['load_end'][0]:.2f}"
    return (
        f"# git {sha} | load (1 min) {load} on {stamp['cpu_count']} x {stamp['cpu_model']}"
        f" | {stamp['started']} .. {stamp['finished']}"
    )


# -- processes and connections -------------------------------------------------------------
def module_argv(name: str, *args: str) -> list[str]:
    """The command line that runs bench module ``name`` (e.g. "loadgen") in a new process
    of this Python; run it with ``cwd=ROOT``, where the ``bench`` package is found."""
    return [sys.executable, "-m", f"bench.{name}", *args]


class Connects(Protocol):
    async def wait_connected(self, timeout: float) -> None: ...


async def wait_connected(*links: Connects | None, timeout: float = 10.0) -> None:
    """Wait until every link given (None: a link the service was built without) is up."""
    for link in links:
        if link is not None:
            await link.wait_connected(timeout)


def publish_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, max_msgs: int, rate_help: str
) -> argparse.ArgumentParser:
    """The ``publish`` command's arguments, shared by bench/loadgen.py and bench/rawpub.py
    (one protocol: ``ready``, a line on stdin, then one JSON line of what was sent)."""
    p = sub.add_parser("publish")
    p.add_argument("--prefix", required=True)
    p.add_argument("--kind", choices=["single", "batch"], default="single")
    p.add_argument("--vehicles", type=int, default=10_000)
    p.add_argument("--per-batch", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help=rate_help)
    p.add_argument("--msg-rate", type=float, default=0.0, help="flat out, capped at msg/s")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-msgs", type=int, default=max_msgs)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--id-prefix", default="ev")
    return p
