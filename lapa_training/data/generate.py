"""Bulk demonstration data without ROS: the simulator and scripted expert in-process, written as
the same episode bags the recorder node writes (same topics, types, metadata).

The ROS path (``lapa data collect``: sim node + recorder node + a teleop over DDS) is what users
do with their arms; this is the fast path for thousands of episodes. Both are seeded: the same
(task, seed) gives the same layout, and here also bit-identical bags (the clock is simulated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data.bag_format import typestore
from lapa_training.data.episode_writer import EpisodeBagWriter

EPOCH_NS = 1_700_000_000 * 10**9  # simulated wall clock of episode 0; each seed starts 1000 s later
# ... modulo this many seeds: header stamps keep their seconds in int32 (until 2038) for any seed
SEED_CLOCK_PERIOD = 100_000


@dataclass
class GeneratedEpisode:
    path: Path
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    frames: np.ndarray | None = None  # (steps + 1, H, W, 3), when keep_arrays
    twists: np.ndarray | None = None  # (steps, 6) commanded, base frame
    grippers: np.ndarray | None = None  # (steps,) commanded opening


class _Messages:
    """rosbags typestore messages for the bag topics, built from simulator state."""

    def __init__(self):
        t = typestore().types
        self.t = t

    def header(self, t_ns: int, frame: str):
        t = self.t
        return t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=t_ns // 10**9,
                                                                                nanosec=t_ns % 10**9),
                                        frame_id=frame)

    def image(self, t_ns: int, rgb: np.ndarray, frame: str):
        h, w = rgb.shape[:2]
        return self.t["sensor_msgs/msg/Image"](header=self.header(t_ns, frame), height=h, width=w, encoding="rgb8",
                                               is_bigendian=0, step=3 * w, data=rgb.reshape(-1))

    def twist(self, t_ns: int, v: np.ndarray):
        t = self.t
        vec = t["geometry_msgs/msg/Vector3"]
        return t["geometry_msgs/msg/TwistStamped"](
            header=self.header(t_ns, bag_format.BASE_FRAME),
            twist=t["geometry_msgs/msg/Twist"](linear=vec(x=float(v[0]), y=float(v[1]), z=float(v[2])),
                                               angular=vec(x=float(v[3]), y=float(v[4]), z=float(v[5]))))

    def pose(self, t_ns: int, pos: np.ndarray, quat_wxyz: np.ndarray):
        t = self.t
        return t["geometry_msgs/msg/PoseStamped"](
            header=self.header(t_ns, bag_format.BASE_FRAME),
            pose=t["geometry_msgs/msg/Pose"](
                position=t["geometry_msgs/msg/Point"](x=float(pos[0]), y=float(pos[1]), z=float(pos[2])),
                orientation=t["geometry_msgs/msg/Quaternion"](w=float(quat_wxyz[0]), x=float(quat_wxyz[1]),
                                                              y=float(quat_wxyz[2]), z=float(quat_wxyz[3]))))

    def joints(self, t_ns: int, obs):
        return self.t["sensor_msgs/msg/JointState"](
            header=self.header(t_ns, ""), name=list(obs.joint_names),
            position=np.asarray(obs.joint_pos, float), velocity=np.asarray(obs.joint_vel, float),
            effort=np.zeros(0))

    def float64(self, value: float):
        return self.t["std_msgs/msg/Float64"](data=float(value))

    def string(self, text: str):
        return self.t["std_msgs/msg/String"](data=text)


def generate_episode(env, out_dir: Path, task: str, seed: int, *, name: str | None = None,
                     storage: str = "mcap", control_rate: float = 10.0, noise: float = 0.03,
                     instruction_set: str = "train", record_actions: bool = True,
                     keep_arrays: bool = False, source: str = "lapa data generate") -> GeneratedEpisode:
    """Run the scripted expert on (task, seed) in env and write the episode as a bag in out_dir.

    At every control step k (time t_k = t_0 + k / control_rate) the bag gets the camera image, the
    TCP pose and joint states stamped t_k, then the expert's twist (stamped t_k, base frame) and
    gripper opening, which the simulator holds until t_{k+1}. With record_actions=False only the
    camera and the instruction are written: an action-free episode, like a plain video of the robot.
    The env's embodiment is stored in the metadata (``embodiment``, and as ``robot``).
    """
    from lapa_sim import tasks
    from lapa_sim.expert import ScriptedExpert

    msgs = _Messages()
    period = 1.0 / control_rate
    period_ns = int(round(period * 1e9))
    obs = env.reset(task, seed, instruction_set)
    ep = env.episode
    expert = ScriptedExpert(ep, noise=noise, seed=seed)
    embodiment = getattr(env, "embodiment", "panda")
    writer = EpisodeBagWriter(out_dir, name or f"{task}_{seed:06d}", storage=storage, metadata={
        "instruction": ep.instruction, "robot": embodiment, "task": task, "seed": seed, "fps": control_rate,
        "source": source, "instruction_set": instruction_set, "embodiment": embodiment,
        "scene_colors": getattr(env, "scene_colors", "fixed"),
        "embodiment_colors": getattr(env, "embodiment_colors", "fixed")})
    try:
        writer.add_topic(bag_format.INSTRUCTION_TOPIC, "std_msgs/msg/String", "latched")
        writer.add_topic(bag_format.IMAGE_TOPIC, "sensor_msgs/msg/Image", "sensor")
        if record_actions:
            writer.add_topic(bag_format.EE_POSE_TOPIC, "geometry_msgs/msg/PoseStamped")
            writer.add_topic(bag_format.JOINT_STATE_TOPIC, "sensor_msgs/msg/JointState")
            writer.add_topic(bag_format.TWIST_TOPIC, "geometry_msgs/msg/TwistStamped")
            writer.add_topic(bag_format.GRIPPER_TOPIC, "std_msgs/msg/Float64")
        t0 = EPOCH_NS + (seed % SEED_CLOCK_PERIOD) * 1000 * 10**9
        writer.write_msg(bag_format.INSTRUCTION_TOPIC, t0, msgs.string(ep.instruction))
        frames, twists, grippers = [], [], []
        max_steps = int(round(tasks.MAX_SECONDS[task] / period))
        success, k = False, 0
        while True:
            t_ns = t0 + k * period_ns
            rgb = env.render("front")
            writer.write_msg(bag_format.IMAGE_TOPIC, t_ns, msgs.image(t_ns, rgb, "front_camera_optical_frame"))
            if record_actions:  # robot state would give the actions away (ingest derives them from EE poses)
                writer.write_msg(bag_format.EE_POSE_TOPIC, t_ns, msgs.pose(t_ns, obs.tcp_pos, obs.tcp_quat))
                writer.write_msg(bag_format.JOINT_STATE_TOPIC, t_ns, msgs.joints(t_ns, obs))
            if keep_arrays:
                frames.append(rgb)
            if success or k >= max_steps:
                break  # the final frame shows the outcome; no command follows it
            twist, gripper = expert.act(obs)
            if record_actions:
                writer.write_msg(bag_format.TWIST_TOPIC, t_ns, msgs.twist(t_ns, twist))
                writer.write_msg(bag_format.GRIPPER_TOPIC, t_ns, msgs.float64(gripper))
            twists.append(twist)
            grippers.append(gripper)
            obs = env.step(twist, gripper, period)
            success = obs.success
            k += 1
        path = writer.close(success, steps=k)
    except BaseException:
        writer.discard()
        raise
    return GeneratedEpisode(path, task, seed, ep.instruction, success, k,
                            np.stack(frames) if keep_arrays else None,
                            np.array(twists).reshape(-1, 6) if keep_arrays else None,
                            np.array(grippers) if keep_arrays else None)


def generate(out_dir: str | Path, task_list: list[str], episodes_per_task: int, *, first_seed: int = 0,
             storage: str = "mcap", image_size: int = 128, control_rate: float = 10.0, noise: float = 0.03,
             instruction_set: str = "train", record_actions: bool = True, progress: bool = True,
             embodiment: str = "panda", combinations: str = "all", workers: int = 1,
             scene_colors: str = "fixed", embodiment_colors: str = "fixed") -> list[GeneratedEpisode]:
    """Write episodes_per_task bags of each task into out_dir; seeds first_seed, first_seed + 1, ...
    (only those of `combinations`, see lapa_sim.tasks.episode_seeds).

    embodiment: "panda", or "floating_gripper" (a free-floating hand in a restyled scene, a stand-in
    for videos of another embodiment; usually with record_actions=False).
    scene_colors: "fixed", or "varied" (table and floor recoloured per episode, see lapa_sim.scene).
    embodiment_colors: "fixed", or "varied" (floating gripper: a skin tone and sleeve colour per episode).
    workers: processes, each with its own simulator (episodes depend on their seed alone, so the bags
    are the same for any number of workers).
    """
    from tqdm import tqdm

    from lapa_sim.scene import check_embodiment, check_embodiment_colors, check_scene_colors
    from lapa_sim.tasks import episode_seeds

    check_embodiment(embodiment)
    check_scene_colors(scene_colors)
    check_embodiment_colors(embodiment_colors, embodiment)
    if workers < 1:
        raise ValueError("workers must be at least 1")
    jobs = [(task, seed) for task in task_list
            for seed in episode_seeds(task, first_seed, episodes_per_task, combinations)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the simulator each worker builds
    look = dict(embodiment=embodiment, scene_colors=scene_colors, embodiment_colors=embodiment_colors)
    options = dict(storage=storage, control_rate=control_rate, noise=noise, instruction_set=instruction_set,
                   record_actions=record_actions)
    done: list[GeneratedEpisode] = []
    bar = tqdm(total=len(jobs), desc="generating episodes", unit="ep", disable=not progress)
    pool = None
    try:
        if workers == 1 or len(jobs) < 2:
            _init_worker(out_dir, image_size, look, options)
            results = map(_generate_one, jobs)
        else:
            import multiprocessing

            # spawn, not fork: every worker builds its own MuJoCo model and renderer from scratch
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(jobs)), initializer=_init_worker, initargs=(out_dir, image_size, look, options))
            results = pool.imap(_generate_one, jobs, chunksize=2)
        for episode in results:
            done.append(episode)
            bar.update(1)
            bar.set_postfix(success=f"{np.mean([e.success for e in done]):.0%}", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _close_worker()
    return done


_worker: dict = {}  # this process's simulator and episode options (see generate)


def _init_worker(out_dir: Path, image_size: int, look: dict, options: dict) -> None:
    from lapa_sim.env import TabletopEnv

    _close_worker()
    _worker.update(env=TabletopEnv(image_size=(image_size, image_size), **look), out_dir=out_dir, options=options)


def _generate_one(job: tuple[str, int]) -> GeneratedEpisode:
    task, seed = job
    return generate_episode(_worker["env"], _worker["out_dir"], task, seed, **_worker["options"])


def _close_worker() -> None:
    env = _worker.pop("env", None)
    if env is not None:
        env.close()
    _worker.clear()
