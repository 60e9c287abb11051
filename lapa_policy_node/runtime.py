"""What every lapa node shares: parameter declaration with clear errors, and a clean run loop.

A user mistake in a parameter (wrong type, out of range, bad topic name, unknown task) must end
in one readable line and a non-zero exit, never a traceback. And a node must get the chance to
publish its last messages (a zero twist, say) on SIGINT/SIGTERM before the context goes away.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterUninitializedException)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from lapa_core.node_params import NodeParams


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the parameter and the fix."""


def declare(node: Node, name: str, default: Any, description: str, *,
            between: tuple[float, float] | None = None) -> Any:
    """Declare a parameter with a description (and an inclusive range); return its value."""
    descriptor = ParameterDescriptor(description=description)
    if between is not None:
        kind = int if isinstance(default, int) else float
        low, high = kind(between[0]), kind(between[1])
        if kind is int:
            descriptor.integer_range = [IntegerRange(from_value=low, to_value=high)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(from_value=low, to_value=high)]
    try:
        value = node.declare_parameter(name, default, descriptor).value
    except (InvalidParameterTypeException, ParameterUninitializedException) as e:
        raise ConfigError(f"parameter '{name}' has the wrong type (expected {type(default).__name__}): {e}") from None
    except InvalidParameterValueException as e:
        limits = f"must lie in [{low}, {high}]" if between else "invalid value"
        raise ConfigError(f"parameter '{name}': {limits}; {e}") from None
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    return value


def declare_params(node: Node, spec: NodeParams) -> dict[str, Any]:
    """Declare every parameter of spec on node (descriptions, ranges); {name: value}, choices checked."""
    values = {}
    for param in spec:
        value = declare(node, param.name, param.default, param.description, between=param.between)
        problem = param.check(value)
        if problem:
            raise ConfigError(f"parameter '{param.name}': {problem}")
        values[param.name] = value
    return values


def read_params(node: Node, spec: NodeParams) -> dict[str, Any]:
    """The current values of spec's parameters (declared before, maybe set since), choices checked."""
    values = {}
    for param in spec:
        value = node.get_parameter(param.name).value
        if isinstance(param.default, float) and isinstance(value, int):
            value = float(value)
        problem = param.check(value)
        if problem:
            raise ConfigError(f"parameter '{param.name}': {problem}")
        values[param.name] = value
    return values


def validate_topic(node: Node, param: str, topic: str) -> str:
    """The fully resolved topic name, or a ConfigError that names the parameter."""
    try:
        return node.resolve_topic_name(topic)
    except Exception as e:  # rclpy raises several types for malformed names
        raise ConfigError(f"parameter '{param}': '{topic}' is not a valid ROS topic name ({e})") from None


def run_node(node_factory: Callable[[], Node], args: list[str] | None = None) -> int:
    """Create and spin a node until SIGINT/SIGTERM; returns the process exit code.

    Signals are handled here rather than by rclpy so that the node's ``before_exit()`` (if it has
    one) still runs with a live context and can publish final messages.
    """
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as e:  # rcl rejects malformed --ros-args (e.g. "-p name:=") with RCLError
        print(f"error: invalid ROS arguments: {e}", file=sys.stderr)
        return 2
    stop = {"signal": None}

    def _handler(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    node = None
    try:
        try:
            node = node_factory()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while stop["signal"] is None and rclpy.ok():
            executor.spin_once(timeout_sec=0.05)
        if stop["signal"] is not None:
            node.get_logger().info(f"{signal.Signals(stop['signal']).name} received, shutting down")
        if hasattr(node, "before_exit"):
            node.before_exit()
        executor.shutdown()
        return 0
    except ExternalShutdownException:
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def spinning(node: Node) -> Iterator[Node]:
    """Spin node in a background thread for the duration of the block (clients, tools, tests);
    the node is destroyed on exit."""
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            try:
                executor.spin_once(timeout_sec=0.02)
            except AttributeError:  # rclpy adds an ActionClient made on another thread to the wait set
                time.sleep(0.001)   # before it has its lock: look again once it is whole

    thread = threading.Thread(target=spin, name=f"spin-{node.get_name()}", daemon=True)
    thread.start()
    try:
        yield node
    finally:
        stop.set()
        thread.join(timeout=2)
        executor.shutdown()
        node.destroy_node()
