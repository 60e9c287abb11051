"""`lapa run <graph>`: start a node graph without ROS 2 `launch`, from the same description and the
same parameter files as its launch file (lapa_policy_node/graphs.py, config/*.yaml).

    lapa run sim_demo --checkpoint runs/lapa_ft/model --instruction "go to the red block"

Each node runs as a child process (``python -m lapa_cli.run --node <module> --ros-args --params-file
<yaml> -p ...``, see node_main) in a process group of its own; its output is shown with a ``[node]``
prefix. Ctrl-C (SIGINT, SIGTERM, SIGHUP) stops the nodes in reverse start order (the policy server
first, so that its final zero twist still reaches the arm): SIGINT, then up to 15 s to exit, then
SIGKILL; a second Ctrl-C kills at once. A node that exits on its own ends the run with one error
line and exit code 1. Children also get SIGTERM if this process dies without cleaning up (Linux
parent-death signal).
"""

from __future__ import annotations

import collections
import math
import os
import signal
import subprocess
import sys
import threading
import time

from lapa_cli import UserError
from lapa_core.child_processes import spawn, stop
from lapa_policy_node.launch_plan import Planned, effective_parameter, plan, ros_value  # noqa: F401 (lapa run's API)

STOP_TIMEOUT = 15.0  # s a node gets to exit after SIGINT before it is killed (a policy server still
# loading its model finishes loading first: that alone can take 10 s on a busy 2-core machine)
READY_TIMEOUT = 120.0  # s to wait for the action server and the first camera frame


def add_parser(sub) -> None:
    from lapa_policy_node.graphs import GRAPHS

    p = sub.add_parser("run", help="start a node graph (e.g. sim_demo: policy server + simulated arm) without "
                                   "ROS 2 launch",
                       description="Start a node graph as child processes, from the same node description and "
                                   "parameter files as its launch file. Stop with Ctrl-C.")
    graphs = p.add_subparsers(dest="graph", metavar="<graph>")
    for graph in GRAPHS.values():
        g = graphs.add_parser(
            graph.name, help=graph.description,
            description=f"Run {graph.description}: "
                        f"{', '.join(n.name for n in graph.nodes)} (launch/{graph.name}.launch.py on ROS 2 "
                        f"installs). Options left out keep the values in the nodes' parameter files. Arguments "
                        f"after --ros-args go to every node; target one node with its name, e.g. "
                        f"--ros-args -p lapa_policy_server:camera_timeout:=1.0, or give a --params-file whose "
                        f"top-level keys are node names.")
        for arg in graph.arguments:
            g.add_argument(arg.option, dest=arg.name, type=arg.type, required=False, metavar=arg.name.upper(),
                           help=arg.help + (" (required)" if arg.required else ""))
        if graph.name == "sim_demo":
            g.add_argument("--instruction", metavar="TEXT",
                           help="once the server is up, send this FollowInstruction goal and print its feedback "
                                "and result (the nodes keep running until Ctrl-C)")
            g.add_argument("--max-steps", type=int, default=0, help="goal's step limit (0 = the server's default)")
            g.add_argument("--goal-timeout", type=float, default=0.0,
                           help="goal's time limit in seconds (0 = the server's default)")


# ---------------------------------------------------------------------------------------------
# what to start: shared with the launch file through the graph (lapa_policy_node/launch_plan.py)
# ---------------------------------------------------------------------------------------------
def node_main(module: str, ros_argv: list[str]) -> int:
    """A child process: ``python -m lapa_cli.run --node MODULE --ros-args ...`` runs MODULE's main().

    Why not ``python -m MODULE``: a SIGINT that arrives while the node is still importing its
    dependencies (MuJoCo, say; another node may have died and the run is ending) would print a
    KeyboardInterrupt traceback. Here it is noted during the import and the node exits quietly;
    once the node runs, lapa_policy_node.runtime.run_node handles SIGINT/SIGTERM itself."""
    import importlib

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    entry = importlib.import_module(module).main
    if interrupted:
        print(f"[lapa run] {module}: interrupted while starting", flush=True)
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)  # until run_node installs its own
    try:
        return int(entry([module, *ros_argv]) or 0)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
_print_lock = threading.RLock()  # re-entrant: signal handlers print too


def say(text: str, *, err: bool = False) -> None:
    with _print_lock:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


class Child:
    def __init__(self, planned: Planned):
        self.name = planned.spec.name
        # its own process group, and SIGTERM from the kernel if this process dies without stopping it
        self.proc = spawn(planned.argv, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.relay = threading.Thread(target=self._relay, name=f"relay-{self.name}", daemon=True)

    def _relay(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            try:
                say(f"[{self.name}] {line}")
            except (OSError, ValueError):  # our stdout is gone (closed pipe): keep draining the child's
                pass

    def poll(self):
        return self.proc.poll()

    def stop(self, hurry: threading.Event | None = None) -> str | None:
        """SIGINT, wait (until STOP_TIMEOUT, or until `hurry` is set), SIGKILL; returns a problem
        description, or None when it exited cleanly."""
        if stop([self.proc], STOP_TIMEOUT, hurry=hurry):
            self.relay.join(timeout=2)
            why = "a second interrupt" if hurry and hurry.is_set() else f"{STOP_TIMEOUT:.0f} s of SIGINT"
            return f"{self.name} was killed: it had not stopped after {why}"
        self.relay.join(timeout=2)
        return None if self.proc.returncode == 0 else f"{self.name} exited with code {self.proc.returncode}"

    def death(self) -> str:
        """One line: how it ended and, when it said one, its last error."""
        code = self.proc.returncode
        if code < 0:
            try:
                how = f"{self.name} was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"{self.name} was killed by signal {-code}"
        else:
            how = f"{self.name} exited with code {code}"
        lines = [line.strip() for line in self.tail if line.strip()]
        errors = [line for line in lines if line.lower().startswith("error") or "[ERROR]" in line or "[FATAL]" in line]
        if any(line.startswith("Traceback") for line in lines):
            errors.append(lines[-1])  # the exception
        return f"{how}: {errors[-1]}" if errors else f"{how} (its output is above)"


# ---------------------------------------------------------------------------------------------
# the optional goal
# ---------------------------------------------------------------------------------------------
class GoalRunner(threading.Thread):
    """Waits for the policy server and a camera frame, sends one goal, prints feedback and result."""

    def __init__(self, server_name: str, image_topic: str, image_transport: str, pose_topic: str, goal: dict):
        super().__init__(name="lapa-run-goal", daemon=True)
        self.server_name, self.image_topic, self.image_transport = server_name, image_topic, image_transport
        self.pose_topic = pose_topic
        self.goal = goal
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.handle = None

    def run(self) -> None:
        try:
            self._run()
        except _Stopped:
            pass
        except Exception as e:  # the goal is an extra: report it, keep the nodes running
            say(f"lapa run: warning: the goal failed: {e}", err=True)
        finally:
            self.finished.set()

    def _wait(self, predicate, what: str, timeout: float = READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise _Stopped
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _run(self) -> None:
        import rclpy
        from action_msgs.msg import GoalStatus
        from rclpy.action import ActionClient
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        from lapa_interfaces.action import FollowInstruction
        from lapa_policy_node.runtime import spinning

        node = rclpy.create_node(f"lapa_run_{os.getpid()}")
        # Everything is created before the node spins: rclpy's ActionClient registers itself with
        # the node before it is fully built, and a concurrent spin then fails on it.
        client = ActionClient(node, FollowInstruction, f"/{self.server_name}/follow_instruction")
        frames = []
        node.create_subscription(CompressedImage if self.image_transport == "compressed" else Image,
                                 self.image_topic, lambda m: frames.append(1) if not frames else None,
                                 qos_profile_sensor_data)
        with spinning(node):
            self._wait(lambda: client.server_is_ready(), f"the action server /{self.server_name}/follow_instruction")
            self._wait(lambda: frames, f"a camera frame on {self.image_topic}")
            # the goal's first step needs a frame and an EE pose at the server: its subscriptions
            # must be matched (the server waits about a second for them, then aborts the goal)
            for topic in filter(None, (self.image_topic, self.pose_topic)):
                resolved = node.resolve_topic_name(topic)
                self._wait(lambda: any(i.node_name == self.server_name
                                       for i in node.get_subscriptions_info_by_topic(resolved)),
                           f"{self.server_name} to subscribe to {topic}")
            goal = FollowInstruction.Goal(**self.goal)
            say(f"[lapa run] goal: '{goal.instruction}'")
            # Right after discovery the server's reply may not reach us yet: resend if unanswered
            # (the resent goal preempts the first one).
            for _attempt in range(3):
                future = client.send_goal_async(goal, feedback_callback=self._on_feedback)
                try:
                    self._wait(future.done, "the goal response", timeout=5.0)
                    break
                except RuntimeError:
                    continue
            else:
                raise RuntimeError(f"/{self.server_name} never answered the goal request")
            self.handle = future.result()
            if not self.handle.accepted:
                raise RuntimeError(f"/{self.server_name} rejected the goal (see its log)")
            say("[lapa run] goal accepted")
            result_future = self.handle.get_result_async()
            self._wait(result_future.done, "the goal result", timeout=math.inf)
            res = result_future.result()
            status = {GoalStatus.STATUS_SUCCEEDED: "SUCCEEDED", GoalStatus.STATUS_ABORTED: "ABORTED",
                      GoalStatus.STATUS_CANCELED: "CANCELED"}.get(res.status, str(res.status))
            success = ("yes" if res.result.success else "no") if res.result.success_known else "unknown"
            say(f"[lapa run] goal result: {status} after {res.result.steps} steps: {res.result.message} "
                f"(task success: {success})")
            self.handle = None

    def _on_feedback(self, msg) -> None:
        f = msg.feedback
        d = list(f.delta) + [0.0] * (7 - len(f.delta))
        say(f"[lapa run] step {f.step}: d_xyz [{d[0]:+.4f} {d[1]:+.4f} {d[2]:+.4f}] m, "
            f"d_rpy [{d[3]:+.4f} {d[4]:+.4f} {d[5]:+.4f}] rad, gripper closure {d[6]:.2f}; "
            f"policy {f.policy_latency_s * 1e3:.1f} ms")

    def stop(self, timeout: float = 3.0) -> None:
        """Cancel a running goal (the arm stops at once), then end the thread."""
        handle = self.handle
        if handle is not None and not self.finished.is_set():
            future = handle.cancel_goal_async()
            deadline = time.monotonic() + min(timeout, 1.0)
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            # let the result (CANCELED) arrive and print
            deadline = time.monotonic() + min(timeout, 1.0)
            while not self.finished.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.stopping.set()
        self.join(timeout=timeout)


class _Stopped(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# lapa run
# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    from lapa_policy_node.graphs import GRAPHS, GraphError

    if args.graph is None:
        raise UserError(f"which graph? known: {', '.join(GRAPHS)} (e.g. lapa run sim_demo --checkpoint DIR)")
    graph = GRAPHS[args.graph]
    values = {arg.name: getattr(args, arg.name) for arg in graph.arguments}
    try:
        planned = plan(graph, values, args.ros_args)
    except GraphError as e:
        option = next((a.option for a in graph.arguments if a.name == e.argument), None)
        if option is None:
            raise UserError(str(e)) from None
        raise UserError(f"{option}{' ' if e.problem.startswith('is ') else ': '}{e.problem}") from None
    goal = None
    if getattr(args, "instruction", None) is not None:
        if not args.instruction.strip():
            raise UserError("--instruction is empty")
        if args.max_steps < 0 or not (math.isfinite(args.goal_timeout) and args.goal_timeout >= 0):
            raise UserError("--max-steps and --goal-timeout must be >= 0")
        goal = {"instruction": args.instruction, "max_steps": args.max_steps, "timeout_s": args.goal_timeout}

    stop = {"signal": None}

    def _handler(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    children: list[Child] = []
    runner = None
    rclpy_up = False
    failed: str | None = None
    try:
        for item in planned:
            if item.argv is None:
                say(f"[lapa run] {item.spec.unavailable_here}")
                continue
            children.append(Child(item))
            say(f"[lapa run] started {item.spec.name} (pid {children[-1].proc.pid})")
        for child in children:  # relay threads only after every fork (preexec_fn and threads do not mix)
            child.relay.start()
        if goal is not None:
            import rclpy
            from rclpy.signals import SignalHandlerOptions

            rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
            rclpy_up = True
            server = next(p for p in planned if p.spec.key == "server")
            runner = GoalRunner(server.spec.name, effective_parameter(server, "image_topic"),
                                effective_parameter(server, "image_transport") or "raw",
                                effective_parameter(server, "ee_pose_topic") or "", goal)
            runner.start()
        while stop["signal"] is None and failed is None:
            time.sleep(0.05)
            for child in children:
                code = child.poll()
                if code is not None:
                    child.relay.join(timeout=2)
                    failed = child.death()
                    break
        if stop["signal"] is not None:
            say(f"[lapa run] {signal.Signals(stop['signal']).name} received: stopping "
                f"{', '.join(c.name for c in reversed(children))}")
    finally:
        # while the nodes stop in order, another Ctrl-C kills whatever is still running
        hurry = threading.Event()

        def _hurry(_signum, _frame):
            if not hurry.is_set():
                hurry.set()
                say("[lapa run] interrupted again: killing the nodes that are still running")

        for s in previous:
            signal.signal(s, _hurry)
        if runner is not None:
            runner.stop()
        problems = [p for p in (c.stop(hurry) for c in reversed(children)) if p]
        if rclpy_up:
            import rclpy

            rclpy.try_shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    if failed is not None:
        say(f"lapa run: error: {failed}", err=True)
        return 1
    if problems:
        say(f"lapa run: error: {'; '.join(problems)}", err=True)
        return 1
    say("[lapa run] all nodes stopped")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--node"] or len(sys.argv) < 3:
        sys.exit("usage: python -m lapa_cli.run --node MODULE [--ros-args ...] (the lapa run child process)")
    sys.exit(node_main(sys.argv[2], sys.argv[3:]))
