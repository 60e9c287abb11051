"""Action chunks from a slow policy, executed at the control rate (ROS-free).

A chunked policy (``chunk_size`` k > 1 and ``act_chunk(image, instruction) -> (k, 7)``) predicts
k control steps from one image. Run one prediction after another and the arm stalls for each
prediction's latency. Instead, ``ChunkedController.tick()`` is called once per control period:

- it hands out the planned step for this tick (a blend of every prediction that covers it);
- when the planned steps left fall to the refill threshold, it starts the next prediction on a
  background thread from the newest camera frame, so the next chunk is ready before the plan runs
  out (the threshold, by default, is the measured prediction latency in control periods, plus one);
- a prediction that arrives d executed steps after its frame was taken drops its first d steps
  (they were meant for moments that have passed) and is blended with what is already planned:
  ACT's temporal ensembling, the prediction i places newer than the oldest one weighing
  exp(-blend_decay * i);
- when the plan runs dry (a prediction later than the threshold allowed for) it returns None: the
  caller decelerates the arm within its acceleration limit instead of repeating an old step.

One prediction at a time, each L periods long, leaves k - L rows that are still ahead when it lands,
so the plan keeps up only when k >= 2 L + 1: a chunk must span twice the prediction time
(``chunk_time_budget``).

Steps are counted in executed planned steps, not in ticks: while the plan is dry the arm does not
follow the plan, so the first steps of the next chunk are still ahead of it (a goal's first chunk,
predicted with the arm at rest, starts at its step 0).

    chunked = ChunkedController(Controller(policy, MotionLimits(), 10.0))
    chunked.reset("stack the blocks")
    every period:  proposal = chunked.tick(newest_rgb)   # None: nothing planned for this tick
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

import numpy as np

from lapa_core.controller import Controller, Proposal
from lapa_core.policy import PolicyStep
from lapa_core.safety import UnsafeCommand, delta_to_twist


def is_chunked(policy) -> bool:
    """Whether the policy predicts several steps at once and can be asked for all of them."""
    size = getattr(policy, "chunk_size", 1)
    return isinstance(size, int) and size > 1 and callable(getattr(policy, "act_chunk", None))


def chunk_time_budget(chunk_size: int) -> float:
    """Control periods one prediction may take with the plan still keeping up (see the module doc)."""
    return (chunk_size - 1) / 2


class ChunkPlan:
    """The planned steps ahead of the arm, indexed by executed step, blended where predictions overlap."""

    def __init__(self, blend_decay: float = 0.0):
        self.blend_decay = float(blend_decay)
        self.executed = 0  # planned steps handed out so far
        self._steps: dict[int, list[tuple[int, np.ndarray]]] = {}  # step -> [(prediction number, delta)]
        self._predictions = 0

    def add(self, chunk: np.ndarray, observed_at: int) -> int:
        """A prediction from the frame taken when `observed_at` steps had been executed: its row j is
        for step observed_at + j. Returns how many rows were already in the past and dropped."""
        chunk = np.asarray(chunk, dtype=float)
        stale = max(0, self.executed - observed_at)
        number = self._predictions
        self._predictions += 1
        for j in range(stale, len(chunk)):
            self._steps.setdefault(observed_at + j, []).append((number, chunk[j]))
        return min(stale, len(chunk))

    def left(self) -> int:
        """Planned steps from the next one on, without a gap."""
        n = 0
        while self.executed + n in self._steps:
            n += 1
        return n

    def next(self) -> np.ndarray | None:
        """The blended delta for the next step (and the step is executed), or None when none is planned."""
        entries = self._steps.pop(self.executed, None)
        if entries is None:
            return None
        self.executed += 1
        numbers = np.array([n for n, _ in entries], dtype=float)
        weights = np.exp(-self.blend_decay * (numbers - numbers.min()))  # oldest first, as in ACT
        deltas = np.stack([d for _, d in entries])
        return (weights[:, None] * deltas).sum(axis=0) / weights.sum()


class _Prediction:
    """One act_chunk call on a thread of its own."""

    def __init__(self, run: Callable[[], np.ndarray], observed_at: int):
        self.observed_at = observed_at
        self.chunk: np.ndarray | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(run,), name="lapa-chunk-prediction", daemon=True)
        self._thread.start()

    def _run(self, run) -> None:
        t0 = time.perf_counter()
        try:
            self.chunk = run()
        except BaseException as e:  # handed to the control loop, which stops the arm
            self.error = e
        self.seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done()


class ChunkedController:
    """A Controller for chunked policies whose predictions run ahead of the arm (see the module doc).

    refill_steps: start the next prediction when this many planned steps are left (0: the measured
    prediction latency in control periods + 1). The policy is only ever called under `policy_lock`,
    which a prediction still running when its goal ended keeps until it returns."""

    def __init__(self, controller: Controller, refill_steps: int = 0, blend_decay: float = 0.0,
                 policy_lock: threading.Lock | None = None):
        self.controller = controller
        self.policy = controller.policy
        self.chunk_size = int(self.policy.chunk_size)
        self.refill_steps = int(refill_steps)
        self.blend_decay = float(blend_decay)
        self.policy_lock = policy_lock or threading.Lock()
        self.plan = ChunkPlan(blend_decay)
        self.instruction = ""
        self.latencies: list[float] = []  # seconds of each finished prediction this goal
        self._prediction: _Prediction | None = None

    def reset(self, instruction: str) -> None:
        """A new goal: an empty plan; waits for a prediction still running for the goal before."""
        with self.policy_lock:
            self.controller.reset(instruction)
        self.instruction = instruction
        self.plan = ChunkPlan(self.blend_decay)
        self.latencies = []
        self._prediction = None

    def refill_threshold(self) -> int:
        if self.refill_steps > 0:
            return min(self.refill_steps, self.chunk_size - 1)
        if not self.latencies:
            return 1
        recent = max(self.latencies[-5:])
        return int(min(self.chunk_size - 1, max(1, math.ceil(recent * self.controller.control_rate - 1e-6) + 1)))

    @property
    def predicting(self) -> bool:
        return self._prediction is not None and not self._prediction.done()

    def take_finished(self) -> float | None:
        """Add a finished prediction to the plan; its seconds, or None when none finished. Raises what
        the prediction raised (UnsafeCommand for output that must not reach the arm)."""
        prediction = self._prediction
        if prediction is None or not prediction.done():
            return None
        self._prediction = None
        if prediction.error is not None:
            raise prediction.error
        chunk = np.asarray(prediction.chunk, dtype=float)
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != 7:
            raise UnsafeCommand(f"act_chunk returned shape {chunk.shape}, expected (steps, 7)")
        if not np.all(np.isfinite(chunk)):
            raise UnsafeCommand("act_chunk returned non-finite values")
        self.plan.add(chunk, prediction.observed_at)
        self.latencies.append(prediction.seconds)
        return prediction.seconds

    def want_prediction(self) -> bool:
        """Whether a prediction should start now: none is running and the plan is at the threshold."""
        return self._prediction is None and self.plan.left() <= self.refill_threshold()

    def start_prediction(self, image: Callable[[], np.ndarray], observed_at: int) -> None:
        """Predict from image() (called on the prediction's thread: conversion costs no control time), a
        frame taken when observed_at steps had been executed."""
        instruction = self.instruction

        def run() -> np.ndarray:
            with self.policy_lock:
                return self.policy.act_chunk(image(), instruction)

        self._prediction = _Prediction(run, observed_at)

    def next_proposal(self) -> Proposal | None:
        """The planned step for this tick, as a twist before the motion limits; None when the plan is dry."""
        delta = self.plan.next()
        if delta is None:
            return None
        twist, closure = delta_to_twist(delta, self.controller.control_rate, self.controller.linear_scale,
                                        self.controller.angular_scale)
        seconds = self.latencies[-1] if self.latencies else 0.0
        return Proposal(PolicyStep(delta=delta, tokens=[], token_kind="action"), twist, closure, seconds)

    def tick(self, image: Callable[[], np.ndarray] | None) -> Proposal | None:
        """One control period: take a finished prediction, hand out this tick's planned step, and start
        the next prediction when the steps left after it are at the threshold (image None: no usable
        frame now). The frame shows the arm before this tick's step: the prediction's first row is for it."""
        self.take_finished()
        observed_at = self.plan.executed
        proposal = self.next_proposal()
        if image is not None and self.want_prediction():
            self.start_prediction(image, observed_at)
        return proposal

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running prediction to finish (tests, shutdown); True when none is running."""
        return self._prediction is None or self._prediction.join(timeout)
