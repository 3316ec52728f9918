"""A real grid model beside the simulation: node powers on a pandapower network.

Each grid node that carries power of its own (vehicles directly under it, or a meter of
its own beyond its children's) becomes one load on a bus of a standard low-voltage
network (``pandapower.networks``: ``cigre_lv`` by default, ``kerber_landnetz_kabel_1``,
... or a pandapower JSON file); a negative load is generation. The network's own loads
stay as they are (its other customers) unless ``keep_loads: false``. Every ``every`` steps an AC power flow
(Newton-Raphson, started from the last step's solution) gives the lowest and highest bus voltage (pu) and the highest line and
transformer loading (%); the steps in between are NaN. The cost of each flow is timed.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from aggregator.grid import GridTopology
from v2g.scenario import ScenarioError

Floats = NDArray[np.float64]

NETWORKS = {
    "cigre_lv": "create_cigre_network_lv",
    "kerber_landnetz_kabel_1": "create_kerber_landnetz_kabel_1",
    "kerber_landnetz_kabel_2": "create_kerber_landnetz_kabel_2",
    "kerber_dorfnetz": "create_kerber_dorfnetz",
    "kerber_vorstadtnetz_kabel_1": "create_kerber_vorstadtnetz_kabel_1",
}
"""Names a scenario may give (pandapower.networks functions), besides a JSON file."""


def load_network(name: str) -> Any:
    """A pandapower network by name (see NETWORKS) or from a pandapower JSON file."""
    import pandapower as pp
    import pandapower.networks as pn

    if name.endswith(".json"):
        if not Path(name).is_file():
            raise ScenarioError(f"powerflow.network: no such file {name}")
        return pp.from_json(name)
    if name not in NETWORKS:
        raise ScenarioError(
            f"powerflow.network: {name!r} is not one of {', '.join(NETWORKS)} nor a .json file"
        )
    return getattr(pn, NETWORKS[name])()


@dataclass(frozen=True, slots=True)
class FlowSeries:
    """Per step (NaN where no flow ran): the extremes of the network's state."""

    v_min_pu: Floats
    v_max_pu: Floats
    line_max_pct: Floats
    trafo_max_pct: Floats
    ms: Floats  # wall time of each flow
    buses: dict[str, str]  # grid node -> bus name

    def summary(self) -> dict[str, Any]:
        ran = ~np.isnan(self.v_min_pu)
        tried = ~np.isnan(self.ms)

        def ext(a: Floats, f: Any) -> float | None:
            return None if not ran.any() else round(float(f(a[ran])), 4)

        return {
            "flows": int(tried.sum()),
            "not_converged": int((tried & ~ran).sum()),
            "v_min_pu": ext(self.v_min_pu, np.min),
            "v_max_pu": ext(self.v_max_pu, np.max),
            "line_max_loading_pct": ext(self.line_max_pct, np.max),
            "trafo_max_loading_pct": ext(self.trafo_max_pct, np.max),
            "ms_per_flow_mean": ext(self.ms, np.mean),
            "ms_per_flow_p95": (
                None if not ran.any() else round(float(np.percentile(self.ms[ran], 95)), 3)
            ),
        }


class Feeder:
    """A pandapower network with one load per grid node that carries power."""

    def __init__(
        self,
        network: Any,
        grid: GridTopology,
        active: list[int],
        buses: dict[str, str | int],
        *,
        keep_loads: bool = True,
    ) -> None:
        import pandapower as pp

        self.net = network
        names = list(network.bus["name"].astype(str))
        by_name = {nm: int(k) for k, nm in zip(network.bus.index, names, strict=True)}
        # Unmapped nodes go on the buses that already carry load, in turn (else any LV bus).
        spare = [int(b) for b in dict.fromkeys(network.load["bus"].tolist())] or [
            int(b) for b in network.bus.index[network.bus["vn_kv"] < 1.0]
        ]
        if not keep_loads:
            network.load["p_mw"] = 0.0
            network.load["q_mvar"] = 0.0
        self.warm = False  # a flow has converged: the next starts from its results
        self.nodes: list[int] = []
        self.load_idx: list[int] = []
        self.buses: dict[str, str] = {}
        k = 0
        for j in active:
            nid = grid.ids[j]
            want = buses.get(nid)
            if want is None:
                bus = spare[k % len(spare)]
                k += 1
            elif isinstance(want, int):
                if want not in network.bus.index:
                    raise ScenarioError(f"powerflow.buses.{nid}: no bus with index {want}")
                bus = want
            else:
                if want not in by_name:
                    raise ScenarioError(f"powerflow.buses.{nid}: no bus named {want!r}")
                bus = by_name[want]
            self.load_idx.append(int(pp.create_load(network, bus, p_mw=0.0, name=f"v2g:{nid}")))
            self.nodes.append(j)
            self.buses[nid] = str(network.bus.at[bus, "name"])

    def flow(self, node_kw: Floats) -> tuple[float, float, float, float]:
        """Run one power flow with these per-node powers (kW, + import); returns
        (v_min, v_max, line max %, trafo max %), NaN each when it does not converge."""
        import pandapower as pp

        net = self.net
        net.load.loc[self.load_idx, "p_mw"] = node_kw[self.nodes] / 1000.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pandas/numba chatter inside pandapower
                # From the last solution: 2-3x fewer Newton steps between close steps.
                pp.runpp(net, numba=False, init="results" if self.warm else "auto")
        except pp.LoadflowNotConverged:
            self.warm = False
            return (np.nan,) * 4
        self.warm = True
        vm = net.res_bus["vm_pu"].to_numpy()
        line = net.res_line["loading_percent"].to_numpy() if len(net.line) else np.zeros(1)
        trafo = net.res_trafo["loading_percent"].to_numpy() if len(net.trafo) else np.zeros(1)
        return float(vm.min()), float(vm.max()), float(line.max()), float(trafo.max())


def run_flows(feeder: Feeder, node_kw: Floats, every: int) -> FlowSeries:
    """A power flow at steps 0, every, 2*every, ... of ``node_kw`` (steps x nodes)."""
    steps = node_kw.shape[0]
    out = np.full((5, steps), np.nan)
    for i in range(0, steps, every):  # steps, not vehicles: one flow each
        t = time.perf_counter()
        res = feeder.flow(node_kw[i])
        out[4, i] = (time.perf_counter() - t) * 1000.0
        out[:4, i] = res
    return FlowSeries(out[0], out[1], out[2], out[3], out[4], dict(feeder.buses))
