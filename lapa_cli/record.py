"""`lapa record`: run the episode recorder node (same as the `lapa_recorder` executable)."""

from __future__ import annotations

from pathlib import Path

from lapa_cli import node_argv
from lapa_sim.resources import share_file

DEFAULT_CONFIG = share_file("config", "recorder.yaml")


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="record demonstrations into rosbag2 bags, one per episode (ROS 2 node)",
                       description="Run the recorder node; start/stop episodes with its ~/start, ~/stop and "
                                   "~/discard services. Extra ROS arguments go after --ros-args. To record "
                                   "scripted demos from the simulated arm, see `lapa data collect`.")
    p.add_argument("--out", type=Path, help="directory for the episode bags (default: config output_dir)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), help="rosbag2 storage (default: config, mcap)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="ROS 2 parameter file (YAML)")


def run(args) -> int:
    from lapa_policy_node import recorder_node

    return recorder_node.main(node_argv("lapa_recorder", args.config,
                                        {"output_dir": args.out, "storage": args.storage}, args.ros_args))
