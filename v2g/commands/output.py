"""How the operator commands print what the aggregator says: one line per answer,
progress report or fleet status, and the capability and forecast tables. Pure text in,
text out (but :func:`print_answer`, which also sets the exit code)."""

from __future__ import annotations

from collections.abc import Callable

import typer

from broker.models import Capability, DispatchProgress, DispatchResult, FleetForecast, FleetStatus


def result_line(r: DispatchResult) -> str:
    """A dispatch or amendment answer: status, allocation, energy and why."""
    line = f"{r.request_id} {r.status}: allocated {r.allocated_kw:+.1f} kW, shortfall {r.shortfall_kw:.1f} kW, {r.vehicles} vehicles"
    if r.delivered_kwh is not None:
        line += (
            f", delivered {r.delivered_kwh:+.2f} kWh of {r.requested_kwh or 0:+.2f} kWh requested"
        )
    if r.reason:
        line += f" ({r.reason})"
    return line


def cancel_line(r: DispatchResult) -> str:
    """A cancel's answer: status, the energy delivered and why."""
    line = f"{r.request_id} {r.status}"
    if r.delivered_kwh is not None:
        line += (
            f": delivered {r.delivered_kwh:+.2f} kWh of {r.requested_kwh or 0:+.2f} kWh requested"
        )
    if r.reason:
        line += f" ({r.reason})"
    return line


def print_answer(
    answer: DispatchResult | None, as_json: bool, line: Callable[[DispatchResult], str]
) -> None:
    """Print the aggregator's answer to a cancel or an amendment, as one JSON object or
    ``line``; exit 1 when it was refused (or the wait was interrupted)."""
    if answer is None:  # interrupted
        raise typer.Exit(1)
    typer.echo(answer.model_dump_json(exclude_none=True) if as_json else line(answer))
    if answer.status == "rejected":
        raise typer.Exit(1)


def progress_line(p: DispatchProgress) -> str:
    """One progress report of a request being followed (``v2g dispatch --wait``)."""
    return (
        f"  {p.ts:%H:%M:%S} requested {p.requested_kw:+.1f} kW delivered {p.delivered_kw:+.1f} kW"
        f" | {p.delivered_kwh:+.2f}/{p.requested_kwh:+.2f} kWh | {p.remaining_s:.0f} s left"
        + ("" if p.score is None else f" | score {p.score:.3f}")
    )


def status_lines(s: FleetStatus) -> list[str]:
    """A fleet status: one line, then one per warning."""
    cap = (
        f" capability_15min={s.capability.min_power_kw:+.0f}..{s.capability.max_power_kw:+.0f}kW"
        if s.capability
        else ""
    )
    line = (
        f"{s.ts:%Y-%m-%dT%H:%M:%SZ} online={s.vehicles_online} plugged={s.vehicles_plugged_in}"
        f" energy={s.energy_kwh:.1f}kWh power={s.power_kw:+.1f}kW{cap}"
    )
    for d in s.dispatches:
        line += f" [{d.request_id} req={d.requested_kw:+.0f} got={d.delivered_kw:+.0f}kW]"
    return [line, *(f"  warning: {w}" for w in s.warnings)]


def capability_lines(cap: Capability) -> list[str]:
    """The capability envelope as a table: fleet net kW it can hold for each duration."""
    lines = [
        f"capability at {cap.ts:%Y-%m-%dT%H:%M:%SZ} ({cap.vehicles} vehicles; - export, + import)",
        f"  {'hold for':>9}  {'min kW':>10}  {'max kW':>10}",
    ]
    for w in cap.windows:
        lines.append(
            f"  {w.duration_s / 60:>6.0f} min  {w.min_power_kw:>+10.1f}  {w.max_power_kw:>+10.1f}"
        )
    return lines


def forecast_lines(forecast: FleetForecast) -> list[str]:
    """The availability forecast as a table, one row per period."""
    lines = [
        f"forecast at {forecast.ts:%Y-%m-%dT%H:%M:%SZ} (confidence 0: no history for that hour yet)",
        f"  {'period (UTC)':<17}  {'min kW':>10}  {'max kW':>10}  {'confidence':>10}  {'samples':>7}",
    ]
    for p in forecast.periods:
        lines.append(
            f"  {p.start:%Y-%m-%d %H:%M}  {p.min_power_kw:>+10.1f}  {p.max_power_kw:>+10.1f}"
            f"  {p.confidence:>10.2f}  {p.samples:>7d}"
        )
    return lines
