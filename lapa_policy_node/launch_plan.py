"""Which processes a node graph starts, with which parameters: what `lapa run <graph>` and the
evaluation through ROS (ros_eval) start, from the graph's description and the nodes' parameter
files (graphs.py, config/*.yaml), the same as the graph's launch file.

    planned = plan(SIM_DEMO, {"checkpoint": "runs/lapa_ft/model", "control_rate": None})
    topic = effective_parameter(planned[1], "image_topic")
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from lapa_policy_node.graphs import GraphError

# the module whose --node mode runs a node's main() in a child process (lapa_cli/run.py node_main):
# named, not imported, as it belongs to the CLI above this layer
NODE_RUNNER = "lapa_cli.run"


@dataclass
class Planned:
    spec: object  # graphs.NodeSpec
    argv: list[str] | None  # None: cannot run here (spec.unavailable_here says why)
    parameters: dict  # the graph's parameters on top of the node's parameter file


def ros_value(value) -> str:
    """A parameter value for `-p name:=value` that rcl parses back to the same type (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        return text if "." in text and "e" not in text else f"{value:.17f}".rstrip("0")
    return json.dumps(str(value))  # double-quoted: a path like 123 or true stays a string


def plan(graph, values: dict, ros_args: list[str] | None = None) -> list[Planned]:
    """The processes `lapa run` starts for `graph` given argument values (None = not given): each
    node's parameter file, then the graph's parameters, then whatever follows --ros-args. A
    GraphError names a bad argument or a missing parameter file."""
    from lapa_sim.resources import share_file

    overrides = graph.parameters(values)
    planned = []
    for spec in graph.nodes:
        params = overrides[spec.key]
        if spec.module is None:
            planned.append(Planned(spec, None, params))
            continue
        config = share_file(spec.params_file)
        if not config.is_file():
            raise GraphError(None, f"parameter file not found: {config}")
        argv = [sys.executable, "-m", NODE_RUNNER, "--node", spec.module, "--ros-args", "--params-file", str(config)]
        for name, value in params.items():
            if value is not None:
                argv += ["-p", f"{name}:={ros_value(value)}"]
        planned.append(Planned(spec, argv + list((ros_args or [])[1:]), params))
    return planned


def effective_parameter(planned: Planned, name: str):
    """A node's parameter as it will start: the graph's value, else its parameter file's."""
    import yaml

    from lapa_sim.resources import share_file

    if name in planned.parameters:
        return planned.parameters[name]
    data = yaml.safe_load(share_file(planned.spec.params_file).read_text()) or {}
    return (data.get(planned.spec.name) or {}).get("ros__parameters", {}).get(name)
