"""Health telemetry of the nodes, ROS-free: rates, ages and latencies in, diagnostic statuses out.

The nodes publish these as diagnostic_msgs/DiagnosticArray on /diagnostics once a second (as
diagnostic_updater does), so rqt_robot_monitor and diagnostic_aggregator show them.

    camera = RateMeter(); camera.add(t)                      # at every frame
    latency = LatencyMeter(); latency.add(seconds)           # at every act()
    statuses = policy_server_statuses(now, camera=camera, latency=latency, period=0.1, ...)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

OK, WARN, ERROR, STALE = 0, 1, 2, 3  # diagnostic_msgs/DiagnosticStatus levels


@dataclass
class Status:
    name: str
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class RateMeter:
    """Arrival times of a stream: its rate over the last window and the age of its newest message."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self.times: deque[float] = deque()
        self.count = 0

    def add(self, t: float) -> None:
        self.times.append(t)
        self.count += 1
        while len(self.times) > 2 and self.times[0] < t - self.window_s:
            self.times.popleft()

    def rate(self, now: float) -> float:
        recent = [t for t in self.times if t >= now - self.window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def age(self, now: float) -> float:
        return now - self.times[-1] if self.times else float("inf")

    def gaps(self, factor: float = 2.5) -> int:
        """Intervals in the window longer than factor × the median: messages that probably went missing."""
        if len(self.times) < 4:
            return 0
        dt = np.diff(np.asarray(self.times))
        return int((dt > factor * np.median(dt)).sum())


class LatencyMeter:
    """The last `size` durations (s), as percentiles."""

    def __init__(self, size: int = 500):
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(float(seconds))

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(np.asarray(self.samples), q)) if self.samples else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not np.isfinite(seconds) else f"{seconds * 1e3:.1f}"


def policy_server_statuses(now: float, *, camera: RateMeter, camera_timeout: float, latency: LatencyMeter,
                           period: float, servo: tuple[int, str] | None, goal: str, checkpoint: str,
                           node: str = "lapa_policy_server", budget: float | None = None) -> list[Status]:
    """Camera, policy, Servo and goal statuses of the policy server. budget: how long one prediction may
    take before the arm waits for it (default: the control period; a chunk predicted ahead has more)."""
    age = camera.age(now)
    cam_level = OK if age <= camera_timeout else (STALE if camera.count == 0 else WARN)
    cam_message = "no frame yet" if camera.count == 0 else (
        "ok" if cam_level == OK else f"no frame for {age:.2f} s (camera_timeout {camera_timeout:g} s)")
    p50, p99 = latency.percentile(50), latency.percentile(99)
    budget = period if budget is None else budget
    slow = p99 is not None and p99 > budget
    limit = f"the control period {period * 1e3:.0f} ms" if budget == period else \
        f"the {budget * 1e3:.0f} ms a chunk leaves it"
    statuses = [
        Status(f"{node}: camera", cam_level, cam_message,
               {"rate_hz": f"{camera.rate(now):.1f}", "age_ms": _ms(age), "frames": str(camera.count)}),
        Status(f"{node}: policy", WARN if slow else OK,
               (f"act() p99 {p99 * 1e3:.0f} ms exceeds {limit}" if slow
                else "no step yet" if p50 is None else "ok"),
               {"latency_p50_ms": _ms(p50), "latency_p99_ms": _ms(p99), "control_period_ms": _ms(period),
                "latency_budget_ms": _ms(budget),
                "steps": str(len(latency.samples)), "checkpoint": checkpoint}),
        Status(f"{node}: goal", OK, goal),
    ]
    if servo is not None:
        code, message = servo
        statuses.append(Status(f"{node}: MoveIt Servo", ERROR if code in (2, 5, 6) else WARN if code in (1, 3, 4)
                               else OK, message or "ok", {"status_code": str(code)}))
    return statuses


def recorder_statuses(now: float, topics: dict[str, RateMeter], recording: str | None,
                      node: str = "lapa_recorder") -> list[Status]:
    """One status per recorded topic (rate, age, probable drops), and the recording state."""
    out = [Status(f"{node}: episode", OK, f"recording '{recording}'" if recording else "idle")]
    for topic, meter in sorted(topics.items()):
        gaps = meter.gaps()
        level = OK if meter.count and not gaps else WARN if meter.count else STALE
        message = "no message yet" if not meter.count else (
            f"{gaps} gap(s) longer than 2.5 periods in the last {meter.window_s:g} s (dropped messages?)" if gaps
            else "ok")
        out.append(Status(f"{node}: {topic}", level, message,
                          {"rate_hz": f"{meter.rate(now):.1f}", "age_ms": _ms(meter.age(now)),
                           "messages": str(meter.count), "gaps": str(gaps)}))
    return out
