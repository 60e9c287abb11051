"""`lapa data <action>`: datasets for training, from rosbags, human videos and other datasets.

    lapa data ingest bags/ videos/ --out runs/data/mix     # build (or --append to) a dataset
    lapa data info runs/data/mix                           # what is in it
    lapa data export runs/data/mix --format lerobot --out runs/lerobot/mix   # a LeRobot v3 dataset
    lapa data info bags/arm_demo --urdf robot.urdf         # a bag's topics, rates and action sources
    lapa data generate --out bags/sim --episodes 50        # simulated demos, in-process (fast)
    lapa data collect --out bags/ros --episodes 5          # simulated demos through ROS nodes

Each action is an (add_parser, run) pair in ACTIONS; add one there to add an action. Heavy imports
happen inside run functions so `lapa --help` stays instant. Bad input (IngestError) becomes a
UserError: one line, exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from lapa_cli import UserError, add_targets, chosen_target


# ---------------------------------------------------------------- ingest
def add_ingest_parser(sub) -> None:
    p = sub.add_parser(
        "ingest", help="build a dataset from rosbags, video folders and datasets",
        description="Read rosbag2 bags (MCAP or sqlite3), folders of videos with captions, LeRobot v3 datasets "
                    "and existing datasets, and write one dataset (docs/DATASET_FORMAT.md): frames resized once, 7-D end-effector "
                    "actions on a fixed control rate, instructions, train/val/test split by episode.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="bag directory or .mcap/.db3 file, folder (searched for bags and videos), video file, "
                        "LeRobot v3 dataset or dataset")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace the dataset at --out")
    mode.add_argument("--append", action="store_true", help="add episodes to the dataset at --out")
    p.add_argument("--image-size", type=int, default=128,
                   help="square frame size in px (center-crop, then INTER_AREA); 0 keeps the source size (default 128)")
    p.add_argument("--frame-codec", choices=("raw", "jpeg"), default="raw",
                   help="how a new dataset stores frames: raw (format v1, memory-mapped arrays) or jpeg (format v2: "
                        "JPEG shards, 10-25x less disk; docs/DATASET_FORMAT.md) (default raw)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that ingest groups of sources side by side, merged in order into the same "
                        "dataset one process makes (default 1)")
    p.add_argument("--rate", type=float, default=10.0, help="control rate of bag frames and actions in Hz (default 10)")
    topics = p.add_argument_group("bag topics (defaults: lapa-ros / MoveIt Servo names, when the bag has them)")
    topics.add_argument("--image-topic", action="append", metavar="TOPIC",
                        help="sensor_msgs/Image or CompressedImage (default /camera/image_raw, else the bag's only "
                             "image topic); give it several times to store several cameras (trainers pick one with "
                             "--set data.camera=TOPIC, the first by default). For a LeRobot dataset: its camera "
                             "feature, e.g. observation.images.front (default: its only camera)")
    topics.add_argument("--twist-topic",
                        help="geometry_msgs/TwistStamped commands (default /servo_node/delta_twist_cmds)")
    topics.add_argument("--pose-topic", help="geometry_msgs/PoseStamped TCP pose (default /ee_pose)")
    topics.add_argument("--gripper-topic", help="std_msgs/Float64 gripper opening command (default /gripper/command)")
    topics.add_argument("--instruction-topic", help="std_msgs/String instruction (default /lapa/instruction)")
    topics.add_argument("--joint-state-topic", help="sensor_msgs/JointState (default /joint_states)")
    frames = p.add_argument_group("frames and actions")
    frames.add_argument("--action-key", metavar="FEATURE",
                        help="LeRobot datasets: the float feature actions come from, e.g. action or observation.state "
                             "(default: none, the episodes are action-free)")
    frames.add_argument("--action-convention", default="delta_rpy",
                        choices=("delta_rpy", "pose_rpy", "pose_quat_xyzw", "pose_quat_wxyz"),
                        help="LeRobot datasets: --action-key holds per-frame end-effector deltas [dx dy dz droll dpitch "
                             "dyaw (gripper)] (delta_rpy, the default) or end-effector poses [x y z, then roll pitch "
                             "yaw or a quaternion, (gripper)]; the gripper maps through --gripper-open/--gripper-closed")
    frames.add_argument("--actions", choices=("auto", "twist", "pose", "tf", "joints", "none"), default="auto",
                        help="where bag actions come from: auto (the first the bag has of twist commands, an EE "
                             "pose topic, the TF tree, joint states + --urdf; else action-free), or force one; none "
                             "ingests bags as action-free video")
    frames.add_argument("--base-frame", default="panda_link0", help="robot base frame of actions (default panda_link0)")
    frames.add_argument("--tcp-frame", default="panda_hand_tcp",
                        help="TCP frame: the end of the TF or URDF chain, and a frame twists may be given in "
                             "(default panda_hand_tcp)")
    frames.add_argument("--urdf", type=Path, metavar="FILE",
                        help="the robot's URDF: actions from joint states by forward kinematics to --tcp-frame, "
                             "and --gripper-joint limits")
    frames.add_argument("--gripper-action", metavar="NAME",
                        help="a control_msgs/GripperCommand action whose goals the bag recorded (default: the "
                             "bag's only one), when it has no gripper command topic")
    frames.add_argument("--gripper-joint", metavar="NAME",
                        help="a finger joint of the joint states as the gripper, when the bag has no gripper "
                             "command topic (0 open at its upper limit .. 1 closed at its lower limit)")
    frames.add_argument("--stale-timeout", type=float, default=0.25,
                        help="seconds after which a twist command counts as zero (default 0.25, as MoveIt Servo)")
    frames.add_argument("--gripper-open", type=float,
                        help="gripper value for open (default 1 on the command topic, the joint's upper limit)")
    frames.add_argument("--gripper-closed", type=float,
                        help="gripper value for closed (default 0 on the command topic, the joint's lower limit)")
    frames.add_argument("--window-s", type=float,
                        help="LAQ window in seconds (default 0.6 for bags, 2.4 for videos)")
    frames.add_argument("--window-frames", type=int, default=6,
                        help="stored frames per window; sets the video frame stride (default 6)")
    text = p.add_argument_group("instructions")
    text.add_argument("--instructions", type=Path, metavar="FILE",
                      help="CSV or JSON mapping bag/video name to instruction (also Something-Something-v2 JSON)")
    text.add_argument("--allow-empty-instruction", action="store_true",
                      help="ingest episodes that have no instruction (with an empty one)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions of episodes (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad inputs with a warning (and count them) instead of stopping")


def run_ingest(args) -> int:
    from lapa_training.data.bag_reader import BagOptions
    from lapa_training.data.dataset import parse_split
    from lapa_training.data.ingest import IngestOptions, ingest

    if args.image_size < 0:
        raise UserError(f"--image-size must be >= 0, not {args.image_size}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, not {args.workers}")
    for name in ("rate", "stale_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.window_s is not None and not args.window_s > 0:
        raise UserError(f"--window-s must be positive, not {args.window_s}")
    if args.window_frames < 1:
        raise UserError(f"--window-frames must be at least 1, not {args.window_frames}")
    if args.gripper_open is not None and args.gripper_open == args.gripper_closed:
        raise UserError("--gripper-open and --gripper-closed must differ")
    if args.urdf is not None:  # a bad URDF or frame fails here once, not once per bag
        from lapa_training.data.bag_reader import load_robot

        robot = load_robot(str(args.urdf))
        if args.actions in ("auto", "joints"):
            robot.chain_joints(args.base_frame, args.tcp_frame)
        if args.gripper_joint:
            robot.joint_limits(args.gripper_joint)
    if args.instructions is not None and not args.instructions.is_file():
        raise UserError(f"instructions file not found: {args.instructions}")
    image_topics = args.image_topic or [None]
    bag = BagOptions(image_topic=image_topics[0], extra_image_topics=tuple(image_topics[1:]),
                     twist_topic=args.twist_topic, pose_topic=args.pose_topic,
                     gripper_topic=args.gripper_topic, instruction_topic=args.instruction_topic, actions=args.actions,
                     joint_topic=args.joint_state_topic, urdf=str(args.urdf) if args.urdf else None,
                     gripper_joint=args.gripper_joint, gripper_action=args.gripper_action,
                     rate_hz=args.rate,
                     stale_timeout_s=args.stale_timeout, base_frame=args.base_frame, tcp_frame=args.tcp_frame,
                     gripper_open=args.gripper_open, gripper_closed=args.gripper_closed)
    options = IngestOptions(image_size=args.image_size, frame_codec=args.frame_codec, bag=bag, window_s=args.window_s,
                            window_frames=args.window_frames, instructions_file=args.instructions,
                            allow_empty_instruction=args.allow_empty_instruction, split=parse_split(args.split),
                            seed=args.seed, skip_bad=args.skip_bad, action_key=args.action_key, workers=args.workers,
                            action_convention=args.action_convention,
                            mode="overwrite" if args.overwrite else "append" if args.append else "create",
                            progress=sys.stderr.isatty())
    report = ingest(args.inputs, args.out, options)
    print(f"ingested {report.summary()}")
    for path, reason in report.skipped:
        print(f"  skipped (bad): {reason}")
    for path in report.incomplete:
        print(f"  skipped (incomplete recording): {path}")
    return 0


# ---------------------------------------------------------------- export
def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a dataset (or a folder of bags) as a LeRobot v3 dataset",
                       description="Write a dataset, or the bags under a folder (ingested first), as a LeRobot v3.0 "
                                   "dataset: parquet frames and episodes, mp4 videos per camera, tasks, statistics "
                                   "(docs/DATASET_FORMAT.md, LeRobot v3).")
    p.add_argument("source", type=Path, metavar="SOURCE", help="dataset directory, or a folder of bags")
    p.add_argument("--format", choices=("lerobot",), default="lerobot", help="output format (default lerobot)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out")
    p.add_argument("--codec", choices=("av1", "h264"), default="av1",
                   help="video codec: av1 (SVT-AV1, as LeRobot records) or h264 (default av1)")
    p.add_argument("--robot-type", help="info.json robot_type (default: the episodes' robot, when they agree)")
    p.add_argument("--image-size", type=int, default=0,
                   help="bags only: square frame size in px at ingest; 0 keeps the recorded size (default 0)")


def run_export(args) -> int:
    from lapa_training.data.lerobot_export import export_lerobot

    if args.image_size < 0:
        raise UserError(f"--image-size must be >= 0, not {args.image_size}")
    report = export_lerobot(args.source, args.out, codec=args.codec, robot_type=args.robot_type,
                            overwrite=args.overwrite, image_size=args.image_size, progress=sys.stderr.isatty())
    for message in report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(f"exported {report.summary()}")
    return 0


# ---------------------------------------------------------------- info
def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="summarize a dataset or a bag",
                       description="Summarize a dataset (episodes, frames, splits, tasks, instructions, sources, disk "
                                   "size, action statistics) or a bag (topics, types, rates, and the image, action "
                                   "and gripper sources ingest would use).")
    p.add_argument("dataset", type=Path, metavar="PATH", help="dataset directory, bag directory or .mcap/.db3 file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    bag = p.add_argument_group("for a bag (as lapa data ingest takes them)")
    bag.add_argument("--urdf", type=Path, metavar="FILE", help="the robot's URDF, to check actions from joint states")
    bag.add_argument("--base-frame", default="panda_link0", help="robot base frame (default panda_link0)")
    bag.add_argument("--tcp-frame", default="panda_hand_tcp", help="TCP frame (default panda_hand_tcp)")
    bag.add_argument("--gripper-joint", metavar="NAME", help="a finger joint as the gripper")


def run_info(args) -> int:
    from lapa_training.data.dataset import Dataset, is_dataset, summarize

    path = args.dataset
    is_bag = (path.is_dir() and (path / "metadata.yaml").is_file()) or (path.is_file() and path.suffix in (".mcap", ".db3"))
    if is_bag and not is_dataset(path):
        from lapa_training.data.bag_info import describe_bag, format_bag_info
        from lapa_training.data.bag_reader import BagOptions

        info = describe_bag(path, BagOptions(urdf=str(args.urdf) if args.urdf else None, base_frame=args.base_frame,
                                             tcp_frame=args.tcp_frame, gripper_joint=args.gripper_joint))
        print(json.dumps(info, indent=2) if args.json else format_bag_info(info))
        return 0
    summary = summarize(Dataset(path))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    h, w = s["frame_shape"][:2] if s["frame_shape"] else (0, 0)
    lines = [
        f"dataset      {s['path']}  ({s['format']}, {s['disk_bytes'] / 2**20:.1f} MiB on disk)",
        f"frames       {s['frames']}  ({w}x{h} RGB; control rate {s['control_rate_hz']:g} Hz; "
        f"stored fps {_counts(s['fps'])}; window frames {_counts(s['window_frames'])})",
        f"episodes     {s['episodes']}  ({s['episodes_with_actions']} with actions, "
        f"{s['episodes_without_actions']} action-free; "
        f"success {s['success']['succeeded']}/{s['success']['known']} known)",
        "splits       " + ", ".join(f"{k} {v['episodes']} ep / {v['frames']} frames / {v['pairs']} pairs"
                                    for k, v in s["splits"].items()),
        f"tasks        {_counts(s['tasks'])}",
        f"instructions {s['instructions']} ({s['distinct_instructions']} distinct)",
        f"sources      {_counts(s['sources'])}",
        *([f"cameras      {', '.join(s['cameras'])} (pick one with --set data.camera=NAME)"] if s.get("cameras") else []),
        "actions      " + f"{'':8s}{'count':>9s}{'mean':>11s}{'std':>11s}{'min':>11s}{'max':>11s}",
    ]
    for name, st in s["action_stats"].items():
        nums = "".join(f"{v:11.4g}" if v is not None else f"{'-':>11s}"
                       for v in (st["mean"], st["std"], st["min"], st["max"]))
        lines.append(f"             {name:8s}{st['count']:9d}{nums}")
    return "\n".join(lines)


def _counts(counter: dict, unit: str = "ep") -> str:
    return ", ".join(f"{k} ({v} {unit})" for k, v in counter.items()) or "-"


# ---------------------------------------------------------------- generate / collect (simulated demos)
def _add_demo_args(p, episodes_help: str) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory for the episode bags")
    p.add_argument("--tasks", default="reach,push,pick_place", help="comma-separated tasks (default: all)")
    p.add_argument("--episodes", type=int, default=10, help=episodes_help)
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first episode of each task (default 0)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage (default mcap)")
    p.add_argument("--image-size", type=int, default=128, help="camera image size in px (default 128)")
    p.add_argument("--noise", type=float, default=0.03, help="expert noise in m/s for diverse demos (default 0.03)")
    p.add_argument("--instruction-set", choices=("train", "paraphrase"), default="train",
                   help="instruction wordings (default train; paraphrase = held-out wordings)")
    p.add_argument("--combinations", choices=("all", "seen", "unseen"), default="all",
                   help="task/target-colour combinations: all seeds (default), or only seeds whose target is not "
                        "(seen) or is (unseen) the task's held-out colour, e.g. to keep them out of training data")


def _check_demo_args(args) -> list[str]:
    from lapa_sim.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(TASKS)}")
    if args.episodes < 1:
        raise UserError(f"--episodes must be at least 1, not {args.episodes}")
    if not 16 <= args.image_size <= 640:
        raise UserError(f"--image-size must lie in [16, 640], not {args.image_size}")
    if args.first_seed < 0 or args.noise < 0:
        raise UserError("--first-seed and --noise must not be negative")
    return tasks


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="bulk simulated demos, in-process, written as episode bags (fast)",
                       description="Run the scripted expert in the simulator in-process and write one bag per "
                                   "episode, in the same format lapa_recorder writes. Seeded: the same seeds give "
                                   "bit-identical bags. For the real ROS path see `lapa data collect`.")
    _add_demo_args(p, "episodes per task (default 10)")
    p.add_argument("--action-free", action="store_true",
                   help="record only camera and instruction (action-free video of the robot)")
    p.add_argument("--embodiment", choices=("panda", "floating_gripper"), default="panda",
                   help="what does the tasks: the Panda arm (default), or a free-floating two-finger hand in a "
                        "restyled scene, a stand-in for videos of another embodiment (use with --action-free)")
    p.add_argument("--scene-colors", choices=("fixed", "varied"), default="fixed",
                   help="the table and floor: the embodiment's own (default), or recoloured per episode (muted "
                        "colours from the seed), like videos from many rooms")
    p.add_argument("--embodiment-colors", choices=("fixed", "varied"), default="fixed",
                   help="the floating gripper's skin and sleeve: its own (default), or a skin tone and sleeve "
                        "colour per episode (from the seed), like videos of many people")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, each with its own simulator (default 1); the bags do not depend on it")


def run_generate(args) -> int:
    from lapa_training.data.episode_writer import EpisodeWriterError
    from lapa_training.data.generate import generate

    tasks = _check_demo_args(args)
    if not 1 <= args.workers <= 256:
        raise UserError(f"--workers must lie in [1, 256], not {args.workers}")
    if args.embodiment_colors == "varied" and args.embodiment != "floating_gripper":
        raise UserError(f"--embodiment-colors varied is for --embodiment floating_gripper (videos of many people); "
                        f"the {args.embodiment} keeps its own colours")
    try:
        done = generate(args.out, tasks, args.episodes, first_seed=args.first_seed, storage=args.storage,
                        image_size=args.image_size, noise=args.noise, instruction_set=args.instruction_set,
                        record_actions=not args.action_free, progress=sys.stderr.isatty(),
                        embodiment=args.embodiment, combinations=args.combinations, workers=args.workers,
                        scene_colors=args.scene_colors, embodiment_colors=args.embodiment_colors)
    except EpisodeWriterError as e:  # episode name taken
        raise UserError(str(e)) from None
    except OSError as e:  # output directory not writable
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from None
    ok = sum(e.success for e in done)
    print(f"wrote {len(done)} episode bags to {args.out} ({ok} successful)")
    return 0


def add_collect_parser(sub) -> None:
    p = sub.add_parser("collect", help="record simulated demos through ROS: sim node + recorder node + teleop",
                       description="Start lapa_sim_arm and lapa_recorder as their own processes and drive the arm "
                                   "with a scripted teleop over DDS, one bag per episode: the path users take on a "
                                   "real arm with their own teleop. Runs in real time.")
    _add_demo_args(p, "episodes per task (default 10)")
    p.add_argument("--logs", type=Path, help="directory for the nodes' logs (default: a temporary directory)")


def run_collect(args) -> int:
    from lapa_policy_node.collect import CollectError, collect

    tasks = _check_demo_args(args)
    try:
        done = collect(args.out, tasks, args.episodes, first_seed=args.first_seed, storage=args.storage,
                       image_size=args.image_size, noise=args.noise, instruction_set=args.instruction_set,
                       progress=sys.stderr.isatty(), log_dir=args.logs, combinations=args.combinations)
    except CollectError as e:
        raise UserError(str(e)) from None
    ok = sum(e.success for e in done)
    print(f"recorded {len(done)} episodes through ROS into {args.out} ({ok} successful)")
    return 0


# ---------------------------------------------------------------- the `lapa data` command
ACTIONS: dict[str, tuple[Callable, Callable[..., int]]] = {
    "ingest": (add_ingest_parser, run_ingest),
    "info": (add_info_parser, run_info),
    "export": (add_export_parser, run_export),
    "generate": (add_generate_parser, run_generate),
    "collect": (add_collect_parser, run_collect),
}


def add_parser(sub) -> None:
    add_targets(sub, "data", ACTIONS, "data_command", "<action>",
                help="datasets: ingest rosbags, videos and LeRobot datasets, inspect, export",
                description="Datasets for LAPA training. Actions: " + ", ".join(ACTIONS) + ".")


def run(args) -> int:
    from lapa_training.data.errors import IngestError

    run_action = chosen_target(args, ACTIONS, "data_command",
                               f"give an action: {', '.join(ACTIONS)} (see lapa data --help)")
    try:
        return int(run_action(args) or 0)
    except IngestError as e:
        raise UserError(" ".join(str(e).split())) from None
