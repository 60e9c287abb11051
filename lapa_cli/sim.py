"""`lapa sim`: run the simulated arm node (same as the `lapa_sim_arm` executable)."""

from __future__ import annotations

from pathlib import Path

from lapa_cli import UserError, node_argv
from lapa_sim.resources import share_file

DEFAULT_CONFIG = share_file("config", "sim_arm.yaml")


def add_parser(sub) -> None:
    p = sub.add_parser("sim", help="run the simulated arm (MuJoCo Panda + MoveIt Servo stand-in) as a ROS 2 node",
                       description="Run the simulated arm node. Extra ROS arguments go after --ros-args.")
    p.add_argument("--task", help="task of the first episode (reach, push, pick_place)")
    p.add_argument("--seed", type=int, help="layout seed of the first episode")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="ROS 2 parameter file (YAML)")


def run(args) -> int:
    from lapa_policy_node import sim_arm_node
    from lapa_sim.tasks import TASKS

    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task '{args.task}'; known tasks: {', '.join(TASKS)}")
    return sim_arm_node.main(node_argv("lapa_sim_arm", args.config, {"task": args.task, "seed": args.seed},
                                       args.ros_args))
