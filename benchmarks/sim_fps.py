"""Simulator speed: physics control steps/s (0.1 s of sim each) and rendered frames/s.

    .venv/bin/python benchmarks/sim_fps.py [--size 128] [--seconds 5]

Prints each as a multiple of real time / of the node's default camera rate (10 Hz), so the
numbers say directly how much headroom the ROS node has on this machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lapa_sim.env import TabletopEnv
from lapa_sim.expert import ScriptedExpert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="square image size (px)")
    ap.add_argument("--seconds", type=float, default=5.0, help="wall time per measurement")
    args = ap.parse_args()
    env = TabletopEnv(image_size=(args.size, args.size))

    env.reset("pick_place", 0)
    expert = ScriptedExpert(env.episode)
    obs, steps, t0 = env.observe(), 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        twist, grip = expert.act(obs)
        obs = env.step(twist, grip, 0.1)
        steps += 1
        if expert.done:
            env.reset("pick_place", steps)
            expert = ScriptedExpert(env.episode)
            obs = env.observe()
    step_rate = steps / (time.perf_counter() - t0)

    env.render()  # create the GL context outside the timing
    frames, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        env.step(np.array([0, 0.02 * np.sin(frames), 0, 0, 0, 0]), 1.0, 0.0)
        env.render()
        frames += 1
    fps = frames / (time.perf_counter() - t0)
    print(f"control steps/s (0.1 s each): {step_rate:8.1f}  = {step_rate * 0.1:6.1f}x real time")
    print(f"rendered frames/s ({args.size}x{args.size}): {fps:8.1f}  = {fps / 10:6.1f}x the 10 Hz camera")


if __name__ == "__main__":
    main()
