"""Run one episode in-process: a controller (expert or policy) acts at a fixed control rate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lapa_sim import tasks
from lapa_sim.env import Observation, TabletopEnv

Controller = Callable[[Observation], tuple[np.ndarray, float]]


@dataclass
class EpisodeResult:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    seconds: float
    frames: list[np.ndarray] = field(default_factory=list)


def run_episode(env: TabletopEnv, controller_factory: Callable[[tasks.Episode], Controller], task: str,
                seed: int, control_period: float = 0.1, max_seconds: float | None = None,
                render_every: int = 0, instruction_set: str = "train",
                done: Callable[[], bool] | None = None) -> EpisodeResult:
    """Reset env to (task, seed), act until success or timeout; frames every render_every steps."""
    obs = env.reset(task, seed, instruction_set)
    controller = controller_factory(env.episode)
    limit = max_seconds if max_seconds is not None else tasks.MAX_SECONDS[task]
    frames: list[np.ndarray] = []
    steps = 0
    success = False
    for steps in range(1, int(round(limit / control_period)) + 1):
        if render_every and (steps - 1) % render_every == 0:
            frames.append(env.render())
        twist, gripper = controller(obs)
        obs = env.step(twist, gripper, control_period)
        if obs.success and (done is None or done()):
            success = True
            break
    if render_every:
        frames.append(env.render())
    return EpisodeResult(task, seed, env.episode.instruction, success, steps, steps * control_period, frames)
