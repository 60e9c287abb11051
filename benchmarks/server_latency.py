"""Policy server timing, two measurements over real DDS:

    .venv/bin/python benchmarks/server_latency.py [--checkpoint DIR] [--threads 2] [--steps 200]
                                                   [--steps-per-goal 15] [--camera-rate 10] [--image-size 128]
    .venv/bin/python benchmarks/server_latency.py --slow-policy [--act-periods 1 3 10] [--chunk-size 25]
                                                   [--goals 4]

--slow-policy: twists from a policy slower than the control period. The constant policy, as a
chunked model (chunk_size steps per prediction) whose every prediction takes 1x, 3x and 10x the
control period, runs twice at each: predicting ahead (chunk_ahead, the default) and, as the
baseline in the same run, predicting only when its chunk is used up (chunk_ahead false: the arm
waits for each prediction). Each goal is cancelled after a random 1.2-2 chunks of motion. A probe in this
process records every twist and reports, per run: twist inter-arrival p50/p99/max, the largest
change between consecutive twists (linear and angular, before the cancel's stop), the stop latency
on cancel (cancel sent -> first zero twist received), and steps per second. A twist that comes later
than servo_command_timeout after the one before counts as a stop and a start from rest: the servo
halted the arm in between. The verdict holds the
predicted-ahead runs to what the safety limits promise: inter-arrival p99 within
servo_command_timeout (the servo never runs a twist longer than the workspace box allows for),
every change within max_accel x period, and a zero twist within one control period of a cancel.

The default measurement: from a camera frame's arrival at the server to the TwistStamped it causes.

The simulated arm publishes camera frames (config/sim_arm.yaml, as `lapa run sim_demo` starts it)
and the policy server runs the policy (default: the tiny VLA preset, random weights, on --threads
CPU threads), each in its own process, over real DDS. The baseline, measured first in this
process on the same thread count, is ``policy.act`` alone on frames of the camera's size.

How it is measured, without editing the server: the server process is the real
``PolicyServerNode`` with thin timing wrappers (a subclass defined here; microseconds each):
  arrival    when the frame's subscription callback ran (``_on_image``), CLOCK_MONOTONIC
  start      when the control loop picked that frame up (its conversion to RGB)
  act        ``policy.act`` wall time, inside the server
  publish    when the twist was handed to DDS, with its header stamp
Frames and twists are matched exactly by header stamp. The server runs many short goals, so
goal start-up (the first step waits for a frame newer than the goal) is in the sample. A probe node in this process subscribes to the same camera and twist topics (same monotonic
clock) and gives the end-to-end view: camera frame delivered -> twist delivered. Reported:
  latency              publish - arrival                      (the server's camera-to-command time)
  frame wait           start - arrival                        (frame age when the step began)
  server overhead      publish - start - act                  (conversion, safety limiter, publish)
  latency - act        what is not the policy: frame wait + server overhead ("ROS overhead")
The control loop steps when a new frame arrives (at least half a control period after the last
step, at most one step per period on average), so frame wait is the control thread's wake-up,
unless the policy was still busy with the previous frame (act slower than the camera) or a late frame made the loop repeat the newest one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_NAME = "lapa_policy_server"  # its parameter file is keyed by this name: no renaming


# ---------------------------------------------------------------------------------------------
# the instrumented server (runs in its own process: this file with --serve-instrumented)
# ---------------------------------------------------------------------------------------------
def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def serve_instrumented(out_file: str, threads: int, ros_argv: list[str]) -> int:
    import torch

    from lapa_policy_node import policy_server_node as psn
    from lapa_policy_node.runtime import run_node

    torch.set_num_threads(threads)
    records: list[dict] = []
    arrivals: dict[int, float] = {}  # frame stamp (ns) -> arrival at the server
    current = threading.local()
    original_to_rgb = psn._to_rgb

    def to_rgb(msg):  # the control loop just took this frame
        current.step = {"frame": _stamp_ns(msg.header.stamp), "start": time.monotonic()}
        current.step["arrival"] = arrivals.get(current.step["frame"])
        return original_to_rgb(msg)

    psn._to_rgb = to_rgb

    class TimedPublisher:
        def __init__(self, publisher):
            self._publisher = publisher

        def publish(self, msg):
            step = getattr(current, "step", None)
            t = time.monotonic()
            self._publisher.publish(msg)
            if step is not None and "act" in step:  # a control-loop twist (not a stop from elsewhere)
                step.update(publish=t, twist=_stamp_ns(msg.header.stamp))
                records.append(step)
                current.step = None

        def __getattr__(self, name):
            return getattr(self._publisher, name)

    class InstrumentedServer(psn.PolicyServerNode):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.twist_pub = TimedPublisher(self.twist_pub)
            act = self.policy.act

            def timed_act(image, instruction):
                t0 = time.perf_counter()
                out = act(image, instruction)
                step = getattr(current, "step", None)
                if step is not None:
                    step["act"] = time.perf_counter() - t0
                return out

            self.policy.act = timed_act

        def _on_image(self, msg):
            arrivals[_stamp_ns(msg.header.stamp)] = time.monotonic()
            if len(arrivals) > 1000:
                for key in sorted(arrivals)[:500]:
                    del arrivals[key]
            super()._on_image(msg)

        def before_exit(self):
            super().before_exit()
            Path(out_file).write_text(json.dumps(records))

    return run_node(InstrumentedServer, ["lapa_policy_server", *ros_argv])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def tiny_checkpoint(directory: Path) -> Path:
    import torch

    from lapa_training.vla import ActionBins, VLAConfig, VLAModel

    torch.manual_seed(0)
    model = VLAModel(VLAConfig.tiny(image_size=64, stage="finetune", objective="action"))
    model.set_action_bins(ActionBins.fit(np.random.default_rng(0).normal(size=(5000, 7)) * 0.005))
    return Path(model.save_pretrained(directory / "tiny_vla"))


def baseline_act(checkpoint: Path, size: int, steps: int) -> np.ndarray:
    from lapa_core.policy import load_policy

    policy = load_policy(checkpoint)
    frames = np.random.default_rng(0).integers(0, 256, size=(8, size, size, 3), dtype=np.uint8)
    instruction = "go to the red block"
    policy.reset(instruction)
    for i in range(20):
        policy.act(frames[i % 8], instruction)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        policy.act(frames[i % 8], instruction)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


class Probe:
    """Arrival times (CLOCK_MONOTONIC) of camera frames and twists, by header stamp."""

    def __init__(self, node, image_topic: str, twist_topic: str):
        from geometry_msgs.msg import TwistStamped
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        self.frames: dict[int, float] = {}
        self.frame_transport: list[float] = []  # arrival (wall) - stamp (wall, taken by the sim at publish)
        self.twists: dict[int, float] = {}
        node.create_subscription(Image, image_topic, self._on_frame, qos_profile_sensor_data)
        node.create_subscription(TwistStamped, twist_topic, self._on_twist, 100)

    def _on_frame(self, msg):
        t, wall = time.monotonic(), time.time_ns()
        stamp = _stamp_ns(msg.header.stamp)
        self.frames[stamp] = t
        self.frame_transport.append((wall - stamp) / 1e9)

    def _on_twist(self, msg):
        self.twists[_stamp_ns(msg.header.stamp)] = time.monotonic()


def run_server_goals(args, checkpoint: Path, log_dir: Path) -> tuple[list[dict], Probe, float]:
    import rclpy
    from rclpy.action import ActionClient
    from rclpy.signals import SignalHandlerOptions

    from lapa_cli.run import effective_parameter, plan
    from lapa_interfaces.action import FollowInstruction
    from lapa_policy_node.graphs import SIM_DEMO
    from lapa_policy_node.runtime import spinning

    values = {"checkpoint": str(checkpoint), "control_rate": args.control_rate or None}
    planned = {p.spec.key: p for p in plan(SIM_DEMO, values)}
    sim_argv = planned["sim"].argv + ["-p", f"image_width:={args.image_size}", "-p", f"image_height:={args.image_size}",
                                      "-p", f"camera_rate:={float(args.camera_rate)}"]
    server_ros = planned["server"].argv[planned["server"].argv.index("--ros-args") + 1:]
    records_file = log_dir / "server_steps.json"
    server_argv = [sys.executable, str(Path(__file__).resolve()), "--serve-instrumented", str(records_file),
                   "--threads", str(args.threads), "--ros-args", *server_ros,
                   # no early end on task success (the goal runs its steps), and no aborts on a late
                   # frame (the watchdog guards a real arm, not this measurement)
                   "-p", 'success_topic:=""', "-p", "camera_timeout:=2.0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    logs = {name: open(log_dir / f"{name}.log", "w") for name in ("sim", "server")}
    procs = {"sim": subprocess.Popen(sim_argv, stdout=logs["sim"], stderr=subprocess.STDOUT, env=env),
             "server": subprocess.Popen(server_argv, stdout=logs["server"], stderr=subprocess.STDOUT, env=env)}
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        with spinning(rclpy.create_node(f"bench_probe_{os.getpid()}")) as node:
            image_topic = effective_parameter(planned["server"], "image_topic")
            twist_topic = effective_parameter(planned["server"], "twist_topic")
            probe = Probe(node, image_topic, twist_topic)
            client = ActionClient(node, FollowInstruction, f"/{SERVER_NAME}/follow_instruction")
            deadline = time.monotonic() + 180
            topic = node.resolve_topic_name(image_topic)
            while not (client.server_is_ready() and probe.frames and any(
                    i.node_name == SERVER_NAME for i in node.get_subscriptions_info_by_topic(topic))):
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        log = (log_dir / f"{name}.log").read_text()[-2000:]
                        raise SystemExit(f"{name} exited ({proc.returncode}): {log}")
                if time.monotonic() > deadline:
                    raise SystemExit("timed out waiting for the server and the camera")
                time.sleep(0.05)
            done_steps = 0
            t_goal = time.monotonic()
            rng = random.Random(0)
            goals = 0
            while done_steps < args.steps:
                # goals start at random phases against the camera
                time.sleep(rng.uniform(0.0, 0.1))
                for _ in range(3):  # resend when the first reply is lost right after discovery
                    steps = min(args.steps_per_goal, args.steps - done_steps)
                    future = client.send_goal_async(FollowInstruction.Goal(
                        instruction="go to the red block", max_steps=steps, timeout_s=3600.0))
                    t0 = time.monotonic()
                    while not future.done() and time.monotonic() - t0 < 5:
                        time.sleep(0.01)
                    if future.done():
                        break
                handle = future.result()
                result_future = handle.get_result_async()
                while not result_future.done():
                    time.sleep(0.05)
                result = result_future.result().result
                done_steps += result.steps
                goals += 1
                if "max_steps" not in result.message:
                    print(f"  a goal ended early, after {result.steps} steps: {result.message}")
                if result.steps == 0:
                    raise SystemExit(f"the server made no steps: {result.message}")
            wall = time.monotonic() - t_goal
            print(f"  {goals} goals, {done_steps} steps")
            time.sleep(0.3)  # the last twists reach the probe
    finally:
        for name in ("server", "sim"):
            _stop_process(procs[name])
        rclpy.try_shutdown()
        for fh in logs.values():
            fh.close()
    if not records_file.exists():
        raise SystemExit(f"the instrumented server wrote no timings:\n{(log_dir / 'server.log').read_text()[-2000:]}")
    return json.loads(records_file.read_text()), probe, wall


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def report(args, base: np.ndarray, records: list[dict], probe: Probe, wall: float, after: np.ndarray) -> None:
    period = 1.0 / (args.control_rate or 10.0)
    steps = [r for r in records if r.get("arrival") is not None]
    lost = len(records) - len(steps)
    latency = np.array([r["publish"] - r["arrival"] for r in steps])
    act = np.array([r["act"] for r in steps])
    wait = np.array([r["start"] - r["arrival"] for r in steps])
    overhead = np.array([r["publish"] - r["start"] - r["act"] for r in steps])
    non_act = latency - act
    e2e = np.array([probe.twists[r["twist"]] - probe.frames[r["frame"]] for r in steps
                    if r["twist"] in probe.twists and r["frame"] in probe.frames])
    twist_delivery = np.array([probe.twists[r["twist"]] - r["publish"] for r in steps if r["twist"] in probe.twists])
    frame_skew = np.array([r["arrival"] - probe.frames[r["frame"]] for r in steps if r["frame"] in probe.frames])
    b50, b99 = _pct(base, 50), _pct(base, 99)
    ms = 1e3

    def row(name, values, note=""):
        p50, p99 = _pct(values, 50), _pct(values, 99)
        print(f"  {name:<40} {p50 * ms:8.2f} {p99 * ms:8.2f} {p50 / b50:9.2f}x  {note}".rstrip())

    print(f"\nbaseline: policy.act alone in this process ({args.threads} threads, {args.image_size}x{args.image_size} "
          f"frames, {len(base)} calls): p50 {b50 * ms:.2f} ms, p99 {b99 * ms:.2f} ms "
          f"(again after the server run: p50 {_pct(after, 50) * ms:.2f} ms, p99 {_pct(after, 99) * ms:.2f} ms)")
    if max(b50, _pct(after, 50)) > 2 * min(b50, _pct(after, 50)):
        print("  WARNING: the two baselines differ by more than 2x: the machine is busy, ratios are unreliable")
    print(f"server: {len(steps)} steps in {wall:.1f} s at {1 / period:.0f} Hz (control step {period * ms:.0f} ms), "
          f"camera {args.camera_rate:g} Hz {args.image_size}x{args.image_size}"
          + (f"; {lost} steps used a frame whose arrival was not recorded" if lost else ""))
    print(f"  {'':<40} {'p50 ms':>8} {'p99 ms':>8} {'p50/base':>10}")
    row("camera arrival -> twist published", latency)
    row("  policy.act inside the server", act, f"p99/base p99 {_pct(act, 99) / b99:.2f}x")
    row("  latency - act (not the policy)", non_act,
        f"{_pct(non_act, 50) / period:.1%} / {_pct(non_act, 99) / period:.1%} of the step (p50/p99)")
    row("    frame wait (frame age at step start)", wait)
    row("    server overhead (publish-start-act)", overhead,
        f"{_pct(overhead, 50) / period:.2%} / {_pct(overhead, 99) / period:.2%} of the step (p50/p99)")
    if len(e2e):
        row("end to end, probe: frame in -> twist in", e2e)
        row("  twist delivery (publish -> probe)", twist_delivery)
        row("  frame: server callback - probe", frame_skew, "callback delay in the server vs an idle probe")
    if probe.frame_transport:
        row("frame transport (sim stamp -> probe)", np.asarray(probe.frame_transport),
            "happens before 'arrival': not in the rows above")
    goal = 0.05 * period
    verdict = lambda v: "meets" if v <= goal else "MISSES"  # noqa: E731
    print(f"goal: ROS overhead <= 5 % of the control step ({goal * ms:.1f} ms)")
    print(f"  server overhead p99 {_pct(overhead, 99) * ms:.2f} ms: {verdict(_pct(overhead, 99))} it")
    print(f"  latency - act p50 {_pct(non_act, 50) * ms:.2f} ms, p99 {_pct(non_act, 99) * ms:.2f} ms: "
          f"{verdict(_pct(non_act, 50))} it at p50, {verdict(_pct(non_act, 99))} it at p99")
    busy = np.array([r["start"] - r["arrival"] for r in steps]) > 0.5 * period
    if busy.any():
        print(f"  {busy.mean():.1%} of steps began more than half a step after their frame arrived: the policy was "
              f"still busy with the previous frame, or a frame was late and the loop repeated the newest one")
    print(f"  policy.act inside the server is {_pct(act, 50) / b50:.2f}x the baseline at p50 "
          f"({_pct(act, 99) / b99:.2f}x at p99): the rest of the server process and the simulator share the CPUs")


# ---------------------------------------------------------------------------------------------
# --slow-policy: twists at the control rate from chunks predicted ahead
# ---------------------------------------------------------------------------------------------
SLOW_STEP = 0.004  # m per step along y: 0.04 m/s at 10 Hz, inside the workspace box for 8 s
SLOW_ACCEL = 0.2  # m/s^2 for the server: low enough that the acceleration limit shapes every ramp


class TwistLog:
    """Every twist on the topic: arrival (CLOCK_MONOTONIC) and value."""

    def __init__(self, node, topic: str):
        from geometry_msgs.msg import TwistStamped

        self.items: list[tuple[float, np.ndarray]] = []
        self.lock = threading.Lock()
        node.create_subscription(TwistStamped, topic, self._on, 100)

    def _on(self, msg) -> None:
        t, v = time.monotonic(), msg.twist
        with self.lock:
            self.items.append((t, np.array([v.linear.x, v.linear.y, v.linear.z, v.angular.x, v.angular.y,
                                            v.angular.z])))

    def between(self, t0: float, t1: float = float("inf")) -> list[tuple[float, np.ndarray]]:
        with self.lock:
            return [(t, v) for t, v in self.items if t0 <= t <= t1]


def _change(a: np.ndarray, b: np.ndarray, servo_halted: bool) -> tuple[float, float]:
    """Linear and angular change from twist a to the next, b. When b came later than the servo runs a
    twist, the servo stopped the arm in between: the arm saw a stop and a start from rest."""
    if servo_halted:
        return (max(float(np.linalg.norm(a[:3])), float(np.linalg.norm(b[:3]))),
                max(float(np.linalg.norm(a[3:])), float(np.linalg.norm(b[3:]))))
    return float(np.linalg.norm(b[:3] - a[:3])), float(np.linalg.norm(b[3:] - a[3:]))


def _wait_until(condition, timeout: float, what: str, procs: dict) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def _stop_process(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slow_policy_run(node, twists: TwistLog, reset, procs: dict, args, checkpoint: Path, ahead: bool,
                    log_dir: Path, planned, period: float) -> dict:
    """One server process, args.goals cancelled goals: the timings of its twists."""
    from rclpy.action import ActionClient

    from lapa_core.node_params import POLICY_SERVER
    from lapa_interfaces.action import FollowInstruction

    timeout = POLICY_SERVER["servo_command_timeout"].default
    server_ros = planned["server"].argv[planned["server"].argv.index("--ros-args") + 1:]
    argv = [*planned["server"].argv[:planned["server"].argv.index("--ros-args") + 1], *server_ros,
            "-p", f"checkpoint:={json.dumps(str(checkpoint))}", "-p", f"chunk_ahead:={str(ahead).lower()}",
            "-p", 'success_topic:=""', "-p", f"max_linear_accel:={SLOW_ACCEL}", "-p", "camera_timeout:=1.0"]
    log = open(log_dir / f"server_{checkpoint.name}_{int(ahead)}.log", "w")
    procs["server"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = ActionClient(node, FollowInstruction, f"/{SERVER_NAME}/follow_instruction")
    rng = random.Random(0)
    gaps, changes, stops, rates = [], [], [], []
    try:
        _wait_until(client.server_is_ready, 120, "the policy server", procs)
        for _ in range(args.goals):
            reset()
            t_send = time.monotonic()
            for _attempt in range(3):  # resend when the first reply is lost right after discovery
                future = client.send_goal_async(FollowInstruction.Goal(instruction="slide left", max_steps=100000,
                                                                       timeout_s=3600.0))
                t0 = time.monotonic()
                while not future.done() and time.monotonic() - t0 < 5:
                    time.sleep(0.01)
                if future.done():
                    break
            handle = future.result()
            _wait_until(lambda: any(abs(v[1]) > 1e-6 for _, v in twists.between(t_send)), 60, "motion", procs)
            t_move = next(t for t, v in twists.between(t_send) if abs(v[1]) > 1e-6)
            time.sleep(rng.uniform(1.2, 2.0) * args.chunk_size * period)  # past a chunk's end
            t_cancel = time.monotonic()
            cancelled = handle.cancel_goal_async()
            _wait_until(cancelled.done, 10, "the cancel answer", procs)
            result = handle.get_result_async()
            _wait_until(result.done, 30, "the cancelled goal's result", procs)
            time.sleep(0.3)
            window = twists.between(t_move, t_cancel)
            times = np.array([t for t, _ in window])
            values = np.array([v for _, v in window])
            gaps += np.diff(times).tolist()
            changes += [_change(a, b, t_b - t_a > timeout) for (t_a, a), (t_b, b) in zip(window, window[1:])]
            rates.append((len(times) - 1) / (times[-1] - times[0]))
            stop = next((t for t, v in twists.between(t_cancel) if np.allclose(v, 0)), None)
            stops.append(float("inf") if stop is None else stop - t_cancel)
    finally:
        client.destroy()
        _stop_process(procs.pop("server"))
        log.close()
    changes = np.array(changes)
    return {"gaps": np.array(gaps), "linear": changes[:, 0].max(), "angular": changes[:, 1].max(),
            "stops": np.array(stops), "rate": float(np.mean(rates))}


def slow_policy(args, tmp: Path) -> None:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from lapa_cli.run import effective_parameter, plan
    from lapa_core.node_params import POLICY_SERVER
    from lapa_core.policy import ConstantPolicy
    from lapa_interfaces.srv import ResetEpisode
    from lapa_policy_node.graphs import SIM_DEMO
    from lapa_policy_node.runtime import spinning

    rate = args.control_rate or 10.0
    period = 1.0 / rate
    placeholder = ConstantPolicy.save(tmp / "plan", [0] * 7)  # each run gives its own checkpoint
    planned = {p.spec.key: p for p in plan(SIM_DEMO, {"checkpoint": str(placeholder), "control_rate": rate})}
    sim_argv = planned["sim"].argv + ["-p", "image_width:=64", "-p", "image_height:=64",
                                      "-p", f"camera_rate:={float(args.camera_rate)}"]
    sim_log = open(tmp / "sim.log", "w")
    procs = {"sim": subprocess.Popen(sim_argv, stdout=sim_log, stderr=subprocess.STDOUT)}
    load = os.getloadavg()[0]
    print(f"slow policy: constant policy, chunks of {args.chunk_size} steps, control {rate:g} Hz, camera "
          f"{args.camera_rate:g} Hz, max_linear_accel {SLOW_ACCEL} m/s^2, {args.goals} cancelled goals per run; "
          f"{os.cpu_count()} CPUs, load average before {load:.2f}")
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    results = []
    try:
        with spinning(rclpy.create_node(f"bench_slow_policy_{os.getpid()}")) as node:
            twists = TwistLog(node, effective_parameter(planned["server"], "twist_topic"))
            resetter = node.create_client(ResetEpisode, "/lapa_sim_arm/reset")
            _wait_until(lambda: resetter.service_is_ready(), 120, "the simulated arm", procs)

            def reset() -> None:
                future = resetter.call_async(ResetEpisode.Request(task="reach", seed=0))
                _wait_until(future.done, 30, "the arm's reset", procs)
                time.sleep(0.3)

            for multiple in args.act_periods:
                checkpoint = ConstantPolicy.save(tmp / f"act_{multiple:g}x", [0, SLOW_STEP, 0, 0, 0, 0, 0],
                                                 control_rate=rate, chunk_size=args.chunk_size,
                                                 seconds_per_step=multiple * period)
                for ahead in (False, True):
                    run = slow_policy_run(node, twists, reset, procs, args, checkpoint, ahead, tmp, planned, period)
                    results.append((multiple, ahead, run))
                    print(f"  act {multiple:g}x period, {'predicted ahead' if ahead else 'baseline (arm waits)'}: "
                          f"inter-arrival p99 {_pct(run['gaps'], 99) * 1e3:.0f} ms", flush=True)
    finally:
        _stop_process(procs["sim"])
        if "server" in procs:
            _stop_process(procs["server"])
        rclpy.try_shutdown()
        sim_log.close()
    timeout = POLICY_SERVER["servo_command_timeout"].default
    linear_bound = SLOW_ACCEL * period
    angular_bound = POLICY_SERVER["max_angular_accel"].default * period
    ms = 1e3
    print(f"\n{'act()':>7} {'predictions':<16} {'inter-arrival ms p50 / p99 / max':>34} "
          f"{'largest change lin m/s, ang rad/s':>35} {'stop ms p50 / max':>19} {'steps/s':>8} {'p99/base':>9}")
    baseline_p99 = {}
    verdicts = []
    for multiple, ahead, run in results:
        gaps, stops = run["gaps"], run["stops"]
        p99 = _pct(gaps, 99)
        if not ahead:
            baseline_p99[multiple] = p99
        ratio = f"{p99 / baseline_p99[multiple]:.2f}x" if ahead and multiple in baseline_p99 else ""
        print(f"{multiple:>6g}x {'ahead' if ahead else 'when used up':<16} "
              f"{_pct(gaps, 50) * ms:>12.0f} / {p99 * ms:>5.0f} / {gaps.max() * ms:>5.0f}    "
              f"{run['linear']:>18.3f}, {run['angular']:.3f}          "
              f"{_pct(stops, 50) * ms:>7.0f} / {stops.max() * ms:>5.0f} {run['rate']:>8.1f} {ratio:>9}")
        if ahead:
            verdicts.append((multiple, p99 <= timeout, run["linear"] <= linear_bound + 1e-9
                             and run["angular"] <= angular_bound + 1e-9, stops.max() <= period))
    print(f"\npromised by the safety limits: inter-arrival p99 <= servo_command_timeout {timeout * ms:.0f} ms; "
          f"change per twist <= max_linear_accel x period {linear_bound:.3f} m/s and max_angular_accel x period "
          f"{angular_bound:.3f} rad/s; a zero twist within one control period ({period * ms:.0f} ms) of a cancel")
    for multiple, rate_ok, change_ok, stop_ok in verdicts:
        word = lambda ok: "within" if ok else "OUTSIDE"  # noqa: E731
        print(f"  act {multiple:g}x period, predicted ahead: inter-arrival {word(rate_ok)}, changes "
              f"{word(change_ok)}, stop {word(stop_ok)}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    if "--serve-instrumented" in sys.argv:
        i = sys.argv.index("--serve-instrumented")
        threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
        ros = sys.argv[sys.argv.index("--ros-args"):] if "--ros-args" in sys.argv else []
        sys.exit(serve_instrumented(sys.argv[i + 1], threads, ros))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="policy checkpoint (default: the tiny VLA preset)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in the server and the baseline")
    ap.add_argument("--steps", type=int, default=200, help="server control steps to time")
    ap.add_argument("--steps-per-goal", type=int, default=15,
                    help="steps per goal; each goal has its own control-timer phase against the camera")
    ap.add_argument("--baseline-steps", type=int, default=200, help="policy.act calls for the baseline")
    ap.add_argument("--camera-rate", type=float, default=10.0, help="simulated camera Hz")
    ap.add_argument("--image-size", type=int, default=128, help="simulated camera width = height (px)")
    ap.add_argument("--control-rate", type=float, default=0.0, help="server Hz (0 = the policy's own)")
    ap.add_argument("--slow-policy", action="store_true",
                    help="measure twists from a policy slower than the control period instead (see above)")
    ap.add_argument("--act-periods", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                    help="--slow-policy: each prediction's time, in control periods")
    ap.add_argument("--chunk-size", type=int, default=25, help="--slow-policy: steps per prediction")
    ap.add_argument("--goals", type=int, default=4, help="--slow-policy: cancelled goals per run")
    args = ap.parse_args()
    if args.slow_policy:
        os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(101, 200)))
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        with tempfile.TemporaryDirectory(prefix="lapa-slow-policy-") as tmp:
            os.environ.setdefault("ROS_LOG_DIR", str(Path(tmp) / "roslog"))
            slow_policy(args, Path(tmp))
        return
    import torch

    torch.set_num_threads(args.threads)
    # own discovery domain (tests use 1..100; the nodes keep their default names), localhost only
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(101, 200)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with tempfile.TemporaryDirectory(prefix="lapa-latency-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("ROS_LOG_DIR", str(tmp / "roslog"))
        checkpoint = args.checkpoint or tiny_checkpoint(tmp)
        load = os.getloadavg()[0]
        print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; checkpoint {checkpoint}; "
              f"load average before: {load:.2f}")
        if load > 0.5 * (os.cpu_count() or 1):
            print("WARNING: the machine is busy with other work; torch threads competing for cores can make "
                  "policy.act 10-50x slower in one process and not in another: ratios are unreliable")
        base = baseline_act(checkpoint, args.image_size, args.baseline_steps)
        records, probe, wall = run_server_goals(args, checkpoint, tmp)
        after = baseline_act(checkpoint, args.image_size, args.baseline_steps)
        report(args, base, records, probe, wall, after)
        print(f"load average after: {os.getloadavg()[0]:.2f} (other work on this machine shares its CPUs with "
              f"the sim, the server and the baseline)")


if __name__ == "__main__":
    main()
