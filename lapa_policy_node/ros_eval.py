"""Closed-loop policy evaluation through the real ROS path: the simulated arm (``lapa_sim_arm``) and
the policy action server (``lapa_policy_server``) each run in a process of their own, started from
the sim_demo graph with the same parameter files as ``lapa run sim_demo``, and an action client
here runs one FollowInstruction goal per (task, seed) job over real DDS.

    report = evaluate_over_ros("runs/lapa_ft/model", [("reach", 100000), ("push", 100001)])

Per job: the sim's ``~/reset`` service sets the layout and returns the instruction; once an EE pose
and a camera frame published after the reset have arrived, a goal with that instruction runs for at
most MAX_SECONDS[task] of control steps; its result says whether the sim's success topic turned true.

What this measures that ``lapa_training.eval_policy.evaluate_policy`` (in-process, lock-step) does
not: the world runs in real time and does not wait for the policy, so a slow policy acts on older
frames and gets fewer steps; the camera is asynchronous (its own rate, sensor QoS over DDS); the
server's pacing, watchdogs (camera/pose staleness abort a goal) and safety limits apply exactly as
on a real arm. ``EpisodeOutcome.seconds`` is wall time of the goal here (steps x period in-process),
``act_ms_*`` is ``policy.act`` inside the server (goal feedback), and ``failure`` is the server's
stop reason when a goal ended other than by success or max_steps.

The nodes run in a private ROS domain on this machine (lapa_policy_node.private_domain), not the
shell's, unless this process already runs rclpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lapa_core.child_processes import spawn, stop
from lapa_policy_node.private_domain import DomainError, private_ros_domain, watch_hint
from lapa_training.eval_policy import EpisodeOutcome, PolicyReport

READY_TIMEOUT = 120.0  # s for both nodes to start (a model load on a busy machine takes a while)
STOP_TIMEOUT = 15.0  # s after SIGINT before a node is killed
SETTLE_NS = 100_000_000  # ns of poses after a reset before the goal (see _Session.reset)
ANSWER_TIMEOUT = 5.0  # s before an unanswered request is sent again (replies lost right after discovery)


class RosEvalError(RuntimeError):
    """A bad checkpoint or job, a node that died or never got ready; the message says which."""


def evaluate_over_ros(policy_dir, jobs: list[tuple], *, image_size: int = 128,
                      instruction_set: str = "train", out_dir=None, control_rate: float | None = None,
                      progress: bool = True, log_dir=None, ros_args: list[str] | None = None) -> PolicyReport:
    """Run every (task, seed) job as a goal of the policy server, its instruction from instruction_set,
    or (task, seed, instruction set) with a set of its own; the report's episodes are in the jobs'
    order. Node logs go to log_dir (else out_dir, else a temporary directory); with out_dir, also
    report.json. ros_args (after ``--ros-args``, as for ``lapa run``) go to both nodes, e.g.
    ``-p lapa_policy_server:camera_timeout:=1.0``."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from tqdm import tqdm

    from lapa_policy_node.graphs import SIM_DEMO, GraphError
    from lapa_policy_node.launch_plan import plan
    from lapa_sim import tasks

    jobs = [(str(task), int(seed), str(own[0] if own else instruction_set)) for task, seed, *own in jobs]
    if not jobs:
        raise RosEvalError("no jobs to evaluate")
    unknown = sorted({task for task, _, _ in jobs} - set(tasks.TASKS))
    if unknown:
        raise RosEvalError(f"unknown task {', '.join(map(repr, unknown))}; tasks are {', '.join(tasks.TASKS)}")
    sets = sorted({which for _, _, which in jobs} - {"train", "paraphrase"})
    if sets:
        raise RosEvalError(f"unknown instruction set {', '.join(map(repr, sets))}; use 'train' or 'paraphrase'")
    if ros_args and ros_args[0] != "--ros-args":
        ros_args = ["--ros-args", *ros_args]
    try:
        planned = {p.spec.key: p for p in plan(SIM_DEMO, {"checkpoint": str(policy_dir),
                                                          "control_rate": control_rate or None}, ros_args)}
    except GraphError as e:
        raise RosEvalError(e.problem if e.argument == "checkpoint" else str(e)) from None
    log_dir = Path(log_dir or out_dir or tempfile.mkdtemp(prefix="lapa-ros-eval-"))
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RosEvalError(f"cannot create {e.filename}: {e.strerror}") from None
    size = ["-p", f"image_width:={int(image_size)}", "-p", f"image_height:={int(image_size)}"]

    own_context = not rclpy.ok()
    nodes: dict[str, tuple[subprocess.Popen, Path]] = {}
    report, t_start = PolicyReport(), time.perf_counter()
    isolation = contextlib.ExitStack()
    try:
        # never the user's domain: these nodes command /servo_node/delta_twist_cmds like a real arm's
        try:
            domain = isolation.enter_context(private_ros_domain())
        except DomainError as e:
            raise RosEvalError(str(e)) from None
        if own_context and progress:
            print(watch_hint(domain), file=sys.stderr)
        server_argv = list(planned["server"].argv)
        # a chunk executed whole, as the in-process evaluation does (before ros_args: they may override it)
        at = server_argv.index("--params-file") + 2
        server_argv[at:at] = ["-p", "chunk_ahead:=false"]
        for name, argv in ((planned["sim"].spec.name, planned["sim"].argv + size),
                           (planned["server"].spec.name, server_argv)):
            nodes[name] = _spawn(argv, log_dir / f"{name}.log")
        if own_context:
            rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        session = _Session(planned["server"], planned["sim"].spec.name, nodes, log_dir)
        with session.spinning():
            rate = session.ready(control_rate)
            latencies = []
            session.reset(*jobs[0])
            session.goal("warm up", 1, 30.0)  # the first round trip after discovery, the first act
            bar = tqdm(jobs, desc="closed-loop eval over ROS", unit="ep", disable=not progress, dynamic_ncols=True)
            for task, seed, which in bar:
                instruction = session.reset(task, seed, which)
                t0 = time.perf_counter()
                result, latency = session.goal(instruction, int(round(tasks.MAX_SECONDS[task] * rate)),
                                               tasks.MAX_SECONDS[task] * 1.5 + 5.0)
                if not result.success_known:
                    raise RosEvalError("the policy server reports no task success (is its success_topic empty?)")
                latencies += latency
                failure = None if result.success or result.message.startswith("max_steps") else result.message
                report.episodes.append(EpisodeOutcome(
                    task=task, seed=seed, instruction=instruction, success=bool(result.success),
                    steps=int(result.steps), seconds=time.perf_counter() - t0, failure=failure))
                bar.set_postfix(success=f"{report.success_rate():.0%}", refresh=False)
    finally:
        _stop([proc for proc, _ in reversed(nodes.values())])
        if own_context:
            rclpy.try_shutdown()
        isolation.close()
    report.finish(latencies, t_start)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = {**report.to_dict(), "path": "ros", "control_rate": rate, "image_size": int(image_size)}
        (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return report


def _spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """A node in a process group of its own (a terminal's Ctrl-C reaches us; we stop the nodes),
    signalled by the kernel if this process dies without stopping it."""
    with open(log, "w") as fh:
        proc = spawn(argv, stdout=fh, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT to all, up to STOP_TIMEOUT to exit, then SIGKILL (also at a second Ctrl-C)."""
    stop(procs, STOP_TIMEOUT)


class _Session:
    """This process's side: a node with the action client, the reset client and the subscriptions."""

    def __init__(self, server, sim_name: str, nodes: dict, log_dir: Path):
        import rclpy
        from geometry_msgs.msg import PoseStamped
        from rclpy.action import ActionClient
        from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from lapa_interfaces.action import FollowInstruction
        from lapa_interfaces.srv import ResetEpisode
        from lapa_policy_node.launch_plan import effective_parameter

        self.Action, self.Reset = FollowInstruction, ResetEpisode
        self.nodes, self.log_dir, self.server_name = nodes, log_dir, server.spec.name
        self.stamps = {"pose": 0, "frame": 0}  # header stamps (ns) of the newest pose and camera frame
        self.status: dict | None = None
        self.node = rclpy.create_node(f"lapa_ros_eval_{os.getpid()}_{random.randint(0, 1 << 20)}")
        # everything is created before the node spins: rclpy's ActionClient is not safe to build
        # while another thread spins its node
        self.client = ActionClient(self.node, FollowInstruction, f"/{self.server_name}/follow_instruction")
        self.reset_client = self.node.create_client(ResetEpisode, f"/{sim_name}/reset")
        compressed = effective_parameter(server, "image_transport") == "compressed"
        self.node.create_subscription(CompressedImage if compressed else Image,
                                      effective_parameter(server, "image_topic"),
                                      lambda m: self._stamp("frame", m), qos_profile_sensor_data)
        self.node.create_subscription(PoseStamped, effective_parameter(server, "ee_pose_topic"),
                                      lambda m: self._stamp("pose", m), 10)
        self.node.create_subscription(String, f"/{self.server_name}/status", self._on_status,
                                      QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def spinning(self):
        from lapa_policy_node.runtime import spinning

        return spinning(self.node)

    def _stamp(self, kind: str, msg) -> None:
        self.stamps[kind] = max(self.stamps[kind], msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)

    def _on_status(self, msg) -> None:
        self.status = json.loads(msg.data)

    def _check(self) -> None:
        for name, (proc, log) in self.nodes.items():
            if proc.poll() is not None:
                raise RosEvalError(f"{name} exited with code {proc.returncode}; the end of {log}:\n{_tail(log)}")

    def _wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _need(self, predicate, what: str, timeout: float) -> None:
        if not self._wait(predicate, timeout):
            raise RosEvalError(f"timed out after {timeout:.0f} s waiting for {what} (node logs in {self.log_dir})")

    def ready(self, control_rate: float | None) -> float:
        """Wait until the server is ready and has its inputs; returns its control rate."""
        log = self.nodes[self.server_name][1]
        self._need(lambda: self.client.server_is_ready() and self.reset_client.service_is_ready()
                   and self.status is not None, "the policy server and the simulated arm", READY_TIMEOUT)
        for line in ("first camera frame", "first EE pose"):  # delivered to the server, not only discovered
            self._need(lambda: line in log.read_text(errors="replace"), f"'{line}' in {log}", READY_TIMEOUT)
        return float(control_rate or self.status["control_rate"])

    def reset(self, task: str, seed: int, instruction_set: str) -> str:
        """Reset the sim; returns the instruction once a pose and a frame from after the reset are here."""
        request = self.Reset.Request(task=task, seed=seed, instruction_set=instruction_set)
        for _ in range(3):  # idempotent: resend when the reply is lost
            future = self.reset_client.call_async(request)
            if self._wait(future.done, ANSWER_TIMEOUT):
                break
        else:
            raise RosEvalError("the simulated arm never answered a reset request")
        response = future.result()
        if not response.success:
            raise RosEvalError(f"reset to {task} seed {seed} failed: {response.message}")
        after = self.node.get_clock().now().nanoseconds
        # a frame from after the reset, and poses for 0.1 s after it: the server's success flag has
        # then had time to see the sim's new (false) one, not a stale true from the last episode
        self._need(lambda: self.stamps["frame"] > after and self.stamps["pose"] > after + SETTLE_NS,
                   "an EE pose and a camera frame after the reset", 10.0)
        return response.instruction

    def goal(self, instruction: str, max_steps: int, timeout_s: float):
        """Run one goal; returns its result and the policy latencies (s) of its steps."""
        for _ in range(3):  # a resent goal preempts an unanswered one
            latencies: list[float] = []
            future = self.client.send_goal_async(
                self.Action.Goal(instruction=instruction, max_steps=max_steps, timeout_s=timeout_s),
                feedback_callback=lambda m, out=latencies: out.append(m.feedback.policy_latency_s))
            if self._wait(future.done, ANSWER_TIMEOUT):
                break
        else:
            raise RosEvalError(f"{self.server_name} never answered a goal request")
        handle = future.result()
        if not handle.accepted:
            raise RosEvalError(f"{self.server_name} rejected the goal '{instruction}' (see its log)")
        result = handle.get_result_async()
        self._need(result.done, f"the result of goal '{instruction}'", timeout_s + 30.0)
        return result.result().result, latencies


def _tail(log: Path, lines: int = 15) -> str:
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(text[-lines:]) or "(no output)"
