"""Commands that work offline, without a running fleet: ``v2g provision`` (broker logins
and certificates), ``v2g simulate`` (a scenario, headless, as fast as the CPU allows) and
``v2g grid show`` (a grid topology file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from broker.settings import check_broker_url
from chargers.auth import check_station_id, new_password
from v2g import logs, ocpp_gateway
from v2g.commands.options import Prefix, Redis, settings_from, url_option
from v2g.commands.running import fail, run
from v2g.gridcmd import grid_app


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``v2g --help`` lists them."""
    provision_group = typer.Typer(
        cls=ProvisionGroup,
        help="Credentials: broker logins (mqtt, the default) and charging stations (station).",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    provision_group.command("mqtt")(provision)
    provision_group.command("station")(station)
    app.add_typer(provision_group, name="provision")
    app.command()(simulate)
    app.add_typer(grid_app, name="grid")  # v2g grid show FILE


def provision(
    out: Annotated[
        Path, typer.Option("--out", help="directory for passwd, credentials.json and certs/")
    ],
    vehicles: Annotated[
        str | None,
        typer.Option(help="comma-separated vehicle ids, e.g. ev-0000,ev-0001", show_default="none"),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            min=0, help="or: this many vehicles, named PREFIX-0000...", show_default="none"
        ),
    ] = None,
    id_prefix: Annotated[str, typer.Option(help="vehicle id prefix for --count")] = "ev",
    operator: Annotated[
        str, typer.Option(help="operator username ('' for none); the ACL grants 'operator'")
    ] = "operator",
    aggregator: Annotated[
        str, typer.Option(help="aggregator username ('' for none); the ACL grants 'aggregator'")
    ] = "aggregator",
    homeassistant: Annotated[
        str,
        typer.Option(
            help="a login for Home Assistant and `v2g homeassistant` ('' for none); the ACL"
            " grants 'homeassistant'",
            show_default="none",
        ),
    ] = "",
    certs: Annotated[
        bool, typer.Option("--certs", help="also a throwaway CA, server and client certificates")
    ] = False,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="new passwords for users that already have one")
    ] = False,
    broker: Annotated[
        str | None,
        url_option(
            "--broker",
            check_broker_url,
            "URL printed for clients",
            "mqtts://127.0.0.1:8883 with --certs, else mqtt://127.0.0.1:1883",
        ),
    ] = None,
) -> None:
    """Create broker logins: DIR/passwd (mosquitto_passwd), DIR/credentials.json (0600), and
    with --certs DIR/certs/. Prints each vehicle's V2G_* connection settings. Vehicle
    usernames are their vehicle ids, as the ACL's %u patterns require."""
    from v2g import provision as prov

    try:
        ids = prov.vehicle_ids(vehicles, count, id_prefix)
        done = prov.provision(
            out,
            ids,
            aggregator=aggregator or None,
            operator=operator or None,
            homeassistant=homeassistant or None,
            certs=certs,
            rotate=rotate,
        )
    except (prov.ProvisionError, ValueError) as err:
        raise fail(str(err), 1) from None
    url = broker or ("mqtts://127.0.0.1:8883" if certs else "mqtt://127.0.0.1:1883")
    for cred in done.all:
        typer.echo(f"# {cred.username} ({cred.role})")
        for line in prov.env_lines(cred, url, done.certs):
            typer.echo(line)
        typer.echo("")
    typer.echo(
        f"# {len(done.created)} created, {len(done.kept)} kept; password file {done.passwd_file},"
        f" credentials {done.credentials_file} (0600)",
        err=True,
    )


def simulate(
    scenario: Annotated[
        Path,
        typer.Argument(
            metavar="SCENARIO",
            help="scenario YAML file (see scenarios/): fleet, start, duration, step_s, requests, regulation",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="output directory (default: sim-out/NAME, NAME from the scenario)"
        ),
    ] = None,
    vehicles: Annotated[
        int | None,
        typer.Option(
            "--vehicles",
            min=1,
            help="fleet size instead of the scenario's; request powers and regulation"
            " capacity scale with it",
            show_default="the scenario's",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="fleet seed instead of the scenario's", show_default="the scenario's"
        ),
    ] = None,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="draw plot.png (matplotlib)")
    ] = True,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="a progress bar on stderr",
            show_default="when stderr is a terminal",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="end with the summary as one JSON object")
    ] = False,
    powerflow_every: Annotated[
        int | None,
        typer.Option(
            "--powerflow-every",
            min=1,
            metavar="N",
            help="with a grid: run a pandapower power flow every N steps (overrides the"
            " scenario's powerflow.every; the network is the scenario's, else cigre_lv)",
            show_default="the scenario's",
        ),
    ] = None,
) -> None:
    """Run a scenario headless: the same vehicle physics, driver profiles and dispatcher as
    the live platform, on a discrete simulated clock, as fast as the CPU allows (no MQTT,
    no Redis).

    Writes to the output directory: intervals.csv (per step: fleet, baseline, requested and
    delivered kW, plugged-in count, energy), requests.csv (requested vs delivered kWh and
    status of each request), vehicles.csv (energy cycled per vehicle, fleets up to 100,000),
    summary.json (drivers left short, Jain's fairness index of energy cycled, speed),
    Parquet copies when pyarrow is installed, and plot.png. Ends with a one-line summary.

    A scenario gives fleet (vehicles, seed, mix of home/workplace/depot), start (ISO time
    with zone), duration and step_s (e.g. 900, 15m, 4h), requests (id, service, power_kw:
    fleet net kW, + charges, - discharges; start: ISO time or +offset; duration) and
    optionally regulation (capacity_kw, start, duration, signal: regd or a CSV path),
    followed as one request per step at baseline + value * capacity_kw. With grid (a
    topology file or inline nodes), fleet.nodes, meters (CSV time_s,node,power_kw), pv
    (a solar plant per node from pvlib's typical-year data), limits and powerflow, every
    step holds the grid's nested limits and the run is compared with plain charging
    (nodes.csv, grid.png, the summary's grid section). A bad scenario is reported field
    by field.

    Example: v2g simulate scenarios/residential-evening-peak.yaml --vehicles 100000
    Example: v2g simulate scenarios/solar-site-firming.yaml --powerflow-every 1
    """
    from v2g import simulate as sim
    from v2g.progress import bar
    from v2g.scenario import ScenarioError, load_scenario

    logs.configure(level="warning")
    try:
        scen = load_scenario(scenario).with_overrides(vehicles=vehicles, seed=seed)
        out_dir = out or Path("sim-out") / scen.name
        with bar(
            f"{scen.name} ({scen.fleet.vehicles:,} vehicles)", scen.n_steps, show=progress
        ) as at:
            done = sim.run(
                scen,
                out_dir,
                plot=plot,
                on_step=lambda i: at(i + 1),
                powerflow_every=powerflow_every,
            )
    except ScenarioError as err:
        fail(str(err), 1)
    if as_json:
        typer.echo(json.dumps(done.summary, default=str))
    else:
        typer.echo(sim.summary_line(done.summary, out_dir))


class ProvisionGroup(TyperGroup):
    """``v2g provision``: an unknown first word (a flag) means the old form, ``mqtt``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["mqtt", *args]
        return super().parse_args(ctx, args)


def station(
    station_id: Annotated[
        str, typer.Argument(metavar="ID", help="the station's id (its URL path and username)")
    ],
    password: Annotated[
        str | None,
        typer.Option(
            "--password", help="its password (16-40 characters); default: a generated one"
        ),
    ] = None,
    redis_url: Redis = None,
    topic_prefix: Prefix = None,
) -> None:
    """Register a charging station for `v2g ocpp` (Security Profile 1/2): a salted hash
    of its password in Redis under the deployment's prefix. A generated password is
    printed once; run it again to replace the password."""
    try:
        check_station_id(station_id)
    except ValueError as err:
        raise fail(str(err)) from None
    if password is not None and not 16 <= len(password) <= 40:
        raise fail("--password: OCPP asks for 16 to 40 characters")
    settings = settings_from(redis_url=redis_url, topic_prefix=topic_prefix)
    secret = password or new_password()
    key = run(ocpp_gateway.provision_station(settings, station_id, secret))
    typer.echo(f"station {station_id} provisioned ({key})", err=True)
    if password is None:
        typer.echo(secret)
