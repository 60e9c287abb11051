"""The controller step: camera image + instruction + TCP pose -> a limited twist and a gripper command.

The policy server (on the arm) and the in-process evaluator (in the simulator) both call this, so
what is evaluated is what runs on the arm:

    controller = Controller(policy, MotionLimits(), control_rate=10.0)
    controller.reset("reach the red block")
    command = controller.step(rgb, "reach the red block", tcp_pos, pose_age)
    send(command.twist, command.closure)

A caller that must read the freshest pose after the policy has thought (the policy server) calls the
two halves itself: ``propose`` (policy -> scaled twist, unlimited) and then ``limit``.
``propose`` raises ``UnsafeCommand`` for NaN/inf or a wrong shape and lets a policy's own exception
through; either way the caller stops the arm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lapa_core.policy import Policy, PolicyStep
from lapa_core.safety import CommandLimiter, MotionLimits, delta_to_twist


@dataclass
class Proposal:
    """What the policy asked for this step, before the motion limits."""

    step: PolicyStep
    twist: np.ndarray  # (6,) m/s and rad/s, speed scales applied
    closure: float  # gripper closure, 0 open .. 1 closed
    act_seconds: float  # time policy.act took


@dataclass
class Command:
    """What goes to the arm this step."""

    twist: np.ndarray  # (6,) after speed, acceleration and workspace limits
    closure: float
    step: PolicyStep
    act_seconds: float


class Controller:
    """policy.act -> delta_to_twist (with speed scales) -> CommandLimiter, one goal or episode at a time."""

    def __init__(self, policy: Policy, limits: MotionLimits, control_rate: float, *,
                 linear_scale: float = 1.0, angular_scale: float = 1.0):
        self.policy = policy
        self.limits = limits
        self.control_rate = float(control_rate)
        self.linear_scale, self.angular_scale = float(linear_scale), float(angular_scale)
        self.limiter = CommandLimiter(limits, 1.0 / self.control_rate)

    def reset(self, instruction: str) -> None:
        """A new goal or episode: the policy forgets its queue, the arm is taken to be still."""
        self.policy.reset(instruction)
        self.limiter.reset()

    def arm_stopped(self) -> None:
        """A zero twist was just sent: the acceleration limit starts again from rest."""
        self.limiter.reset()

    def propose(self, image: np.ndarray, instruction: str) -> Proposal:
        t0 = time.perf_counter()
        step = self.policy.act(image, instruction)
        act_seconds = time.perf_counter() - t0
        twist, closure = delta_to_twist(step.delta, self.control_rate, self.linear_scale, self.angular_scale)
        return Proposal(step, twist, closure, act_seconds)

    def limit(self, proposal: Proposal, tcp_pos: np.ndarray | None, pose_age: float = 0.0) -> Command:
        """tcp_pos None: no workspace box (see CommandLimiter)."""
        twist = self.limiter(proposal.twist, tcp_pos, pose_age)
        return Command(twist, proposal.closure, proposal.step, proposal.act_seconds)

    def step(self, image: np.ndarray, instruction: str, tcp_pos: np.ndarray | None,
             pose_age: float = 0.0) -> Command:
        return self.limit(self.propose(image, instruction), tcp_pos, pose_age)
