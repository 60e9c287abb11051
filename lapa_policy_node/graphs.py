"""Node graphs: which nodes run together, from which parameter files, and how arguments become
parameters. The one description that both a ROS 2 launch file (``launch/sim_demo.launch.py``, real
ROS installs) and ``lapa run <graph>`` (here, without ``launch``) read, so the two cannot drift.

Pure Python and the standard library only: no rclpy, no launch, so a launch file can import it
wherever the package is installed, and tests can inspect it anywhere.

Semantics shared by both front ends:

- every node gets its parameter file (``config/*.yaml``, whose top-level key is the node's name),
  then the graph's fixed wiring (``NodeSpec.fixed``), then the arguments that were given;
- an argument that is not given (``None``, or ``""`` from a launch argument left at its default)
  keeps the parameter file's value, so editing ``config/*.yaml`` changes both front ends alike;
- values are converted to the argument's type (a launch argument is a string; ``control_rate:=10``
  must reach the node as the double 10.0, not the integer 10 that rclpy would reject).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

PACKAGE = "lapa_ros"


class GraphError(ValueError):
    """A bad argument value or a missing required argument; the message names the argument."""

    def __init__(self, argument: str | None, problem: str):
        self.argument, self.problem = argument, problem
        super().__init__(f"argument '{argument}': {problem}" if argument else problem)


@dataclass(frozen=True)
class Argument:
    """A launch argument (``name:=value``) / a ``lapa run`` option (``--name-with-dashes``)."""

    name: str
    type: type  # str, int or float
    help: str
    targets: tuple[tuple[str, str], ...]  # (node key, parameter name) pairs it sets
    required: bool = False
    check: Callable[[Any], Any] | None = None  # validates/normalises a given value; raises ValueError

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        """The parameter value for `value`; None when not given (keep the parameter file's)."""
        if value is None or (isinstance(value, str) and value.strip() == ""):
            if self.required:
                raise GraphError(self.name, f"is required: {self.help}")
            return None
        if self.type is str:
            converted = str(value)
        else:
            try:
                if self.type is int and isinstance(value, float):
                    raise ValueError
                converted = self.type(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                raise GraphError(self.name, f"{value!r} is not {_type_name(self.type)}") from None
        if self.check is not None:
            try:
                converted = self.check(converted)
            except ValueError as e:
                raise GraphError(self.name, str(e)) from None
        return converted


@dataclass(frozen=True)
class NodeSpec:
    key: str  # short id inside the graph ("sim", "server")
    name: str  # ROS node name; also the top-level key of its parameter file
    package: str
    executable: str  # what a launch file starts (a console script of `package`)
    module: str | None  # what `lapa run` starts here (python -m module); None = needs a ROS 2 install
    params_file: str | None = None  # relative to the package share directory
    fixed: Mapping[str, Any] = field(default_factory=dict)  # wiring between the graph's nodes
    file_params: Mapping[str, str] = field(default_factory=dict)  # parameter -> share file whose text it is
    unavailable_here: str = ""  # why `lapa run` cannot start it (module None)


@dataclass(frozen=True)
class Graph:
    name: str
    description: str
    nodes: tuple[NodeSpec, ...]
    arguments: tuple[Argument, ...]

    def node(self, key: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.key == key:
                return spec
        raise KeyError(key)

    def parameters(self, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """node key -> parameters on top of its parameter file: the fixed wiring, then the given
        arguments. `values` maps argument names to values (strings from a launch file, typed
        values from the CLI, None/"" = not given); unknown names are an error."""
        known = {a.name for a in self.arguments}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GraphError(None, f"graph '{self.name}' has no argument {', '.join(map(repr, unknown))} "
                                   f"(known: {', '.join(sorted(known))})")
        out = {spec.key: dict(spec.fixed) for spec in self.nodes}
        for arg in self.arguments:
            value = arg.convert(values.get(arg.name))
            if value is None:
                continue
            for key, param in arg.targets:
                out[key][param] = value
        return out


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(t, t.__name__)


def policy_checkpoint(value: str) -> str:
    """A checkpoint directory that exists and has a config.json, as an absolute path: fail before
    any node starts rather than when the policy server loads it (same messages as load_policy)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint not found: {value}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{value} is not a policy checkpoint (no config.json)")
    return str(path.resolve())


# ---------------------------------------------------------------------------------------------
# sim_demo: a policy checkpoint drives the simulated arm
# ---------------------------------------------------------------------------------------------
_SIM = "lapa_sim_arm"
_SERVER = "lapa_policy_server"

SIM_DEMO = Graph(
    name="sim_demo",
    description="the simulated arm driven by the LAPA policy action server",
    nodes=(
        NodeSpec(key="sim", name=_SIM, package=PACKAGE, executable="lapa_sim_arm",
                 module="lapa_policy_node.sim_arm_node", params_file="config/sim_arm.yaml",
                 # as a real MoveIt Servo: twists only after switch_command_type and pause_servo, freshly stamped
                 fixed={"servo_handshake": True}),
        NodeSpec(key="server", name=_SERVER, package=PACKAGE, executable="lapa_policy_server",
                 module="lapa_policy_node.policy_server_node", params_file="config/policy_server.yaml",
                 fixed={
                     # goals end when the simulated task succeeds
                     "success_topic": f"/{_SIM}/success",
                 }),
        NodeSpec(key="robot_state_publisher", name="robot_state_publisher", package="robot_state_publisher",
                 executable="robot_state_publisher", module=None,
                 file_params={"robot_description": "urdf/lapa_panda.urdf"},
                 unavailable_here="robot_state_publisher is not available without a ROS 2 install (no TF or "
                                  "/robot_description here); launch/sim_demo.launch.py starts it"),
    ),
    arguments=(
        Argument("checkpoint", str, "policy checkpoint directory (config.json + weights)",
                 (("server", "checkpoint"),), required=True, check=policy_checkpoint),
        Argument("image_topic", str, "camera topic: the simulated camera publishes it, the server reads it",
                 (("sim", "image_topic"), ("server", "image_topic"))),
        Argument("twist_topic", str, "TwistStamped topic (MoveIt Servo's input): the server commands it, "
                                     "the simulated arm obeys it",
                 (("sim", "twist_topic"), ("server", "twist_topic"))),
        Argument("control_rate", float, "policy steps per second (0 = the policy's own rate)",
                 (("server", "control_rate"),)),
        Argument("task", str, "simulated task of the first episode (reach, push, pick_place)", (("sim", "task"),)),
        Argument("seed", int, "layout seed of the first episode", (("sim", "seed"),)),
    ),
)

GRAPHS: dict[str, Graph] = {SIM_DEMO.name: SIM_DEMO}
