"""The simulated arm as a plain Python object: reset to a seeded task, command twists, observe.

``TabletopEnv`` knows nothing about ROS. The ``lapa_sim_arm`` node drives it from wall-clock
timers; data generators and tests step it as fast as the CPU allows. Both go through the same
``TwistServo`` and the same physics, so what a policy sees over ROS and in-process is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np
import transforms3d

from lapa_sim import scene, tasks
from lapa_sim.servo import MocapServo, ServoLimits, TwistServo

PHYSICS_DT = 0.002
SERVO_DT = 0.01  # Servo publishes joint targets at 100 Hz


@dataclass
class Observation:
    time: float
    tcp_pos: np.ndarray  # (3,) m, base frame
    tcp_quat: np.ndarray  # (4,) w x y z, base frame
    gripper_opening: float  # 0 closed .. 1 fully open (measured)
    joint_names: tuple[str, ...]
    joint_pos: np.ndarray
    joint_vel: np.ndarray
    block_pos: np.ndarray  # (N_BLOCKS, 3)
    block_quat: np.ndarray  # (N_BLOCKS, 4)
    success: bool

    @property
    def tcp_rpy(self) -> np.ndarray:
        return np.array(transforms3d.euler.quat2euler(self.tcp_quat, "sxyz"))


class TabletopEnv:
    """MuJoCo tabletop with the Panda arm, a Servo-like twist interface and the task family.

    embodiment="floating_gripper" swaps the arm for a free-floating two-finger hand (see
    lapa_sim.scene) behind the same interface: twists move the TCP, the gripper opens and closes,
    observations have the same fields (joint_* then hold only the two finger joints).
    scene_colors="varied" recolours the table and floor at each reset from the episode's seed
    (lapa_sim.scene.varied_backdrop); "fixed" keeps the embodiment's own. embodiment_colors="varied"
    (floating gripper only) gives the hand a skin tone and a sleeve colour from the seed
    (lapa_sim.scene.varied_hand).
    """

    def __init__(self, image_size: tuple[int, int] = (128, 128), cameras: tuple[str, ...] = ("front",),
                 servo_limits: ServoLimits | None = None, embodiment: str = "panda",
                 scene_colors: str = "fixed", embodiment_colors: str = "fixed"):
        self.embodiment = scene.check_embodiment(embodiment)
        self.scene_colors = scene.check_scene_colors(scene_colors)
        self.embodiment_colors = scene.check_embodiment_colors(embodiment_colors, embodiment)
        self.model = scene.build_model(embodiment=embodiment)
        self.data = mujoco.MjData(self.model)
        self.image_height, self.image_width = int(image_size[0]), int(image_size[1])
        unknown = [c for c in cameras if c not in ("front", "wrist")]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; available: front, wrist")
        self.cameras = tuple(cameras)
        if self.embodiment == "panda":
            self.servo = TwistServo(self.model, self.data, limits=servo_limits)
            self._arm_qpos = self.servo.qpos_idx
            self._finger_qpos = np.array([self.model.joint(n).qposadr[0] for n in scene.FINGER_JOINTS])
            self._joint_names = scene.ARM_JOINTS + scene.FINGER_JOINTS
            self._joint_qpos = np.concatenate([self._arm_qpos, self._finger_qpos])
        else:
            self.servo = MocapServo(self.model, self.data, limits=servo_limits)
            self._hand_qpos = self.model.joint(scene.HAND_FREE_JOINT).qposadr[0]
            self._hand_mocap = self.model.body(scene.HAND_TARGET).mocapid[0]
            self._finger_qpos = np.array([self.model.joint(n).qposadr[0] for n in scene.HAND_FINGER_JOINTS])
            self._joint_names = scene.HAND_FINGER_JOINTS
            self._joint_qpos = self._finger_qpos
            self._hand_geoms = [np.array([self.model.geom(n).id for n in names]) for names in
                                (scene.HAND_SKIN_GEOMS, scene.HAND_FINGER_GEOMS, scene.HAND_SLEEVE_GEOMS)]
        self._gripper_ctrl = self.model.actuator("gripper_pos").id
        self._joint_dof = np.array([self.model.joint(n).dofadr[0] for n in self._joint_names])
        self._block_qpos = np.array([self.model.joint(f"block{i}_free").qposadr[0] for i in range(scene.N_BLOCKS)])
        self._block_geom = np.array([self.model.geom(f"block{i}").id for i in range(scene.N_BLOCKS)])
        self._pad_geom = self.model.geom("pad").id
        self._backdrop_geoms = np.array([self.model.geom("table").id, self.model.geom("floor").id])
        self._pad_mocap = self.model.body("pad").mocapid[0]
        self._tcp_site = self.model.site("tcp").id
        self._renderer: mujoco.Renderer | None = None
        self._gripper_target = 1.0
        self.episode: tasks.Episode | None = None
        self.reset("reach", seed=0)

    # ----------------------------------------------------------------- episodes
    def reset(self, task: str, seed: int, instruction_set: str = "train",
              episode: tasks.Episode | None = None) -> Observation:
        """Start a new seeded episode of task (or replay a given Episode)."""
        ep = episode or tasks.sample_episode(task, seed, instruction_set)
        mujoco.mj_resetData(self.model, self.data)
        start = np.asarray(scene.HOME_TCP_POS) + ep.start_offset  # each episode's own start point
        if self.embodiment == "panda":
            self.data.qpos[self._arm_qpos] = scene.HOME_Q
            if np.any(ep.start_offset):
                error = self.servo.place_tcp(start)
                if error > 0.002:  # pragma: no cover - every offset in tasks.START_OFFSET_* is reachable
                    raise RuntimeError(f"cannot place the TCP at the start point {start.round(3).tolist()} "
                                       f"(off by {error * 1000:.1f} mm)")
            self.data.ctrl[:7] = self.data.qpos[self._arm_qpos]
        else:
            home = [*start, *scene.HOME_TCP_QUAT]
            self.data.qpos[self._hand_qpos:self._hand_qpos + 7] = home
            self.data.mocap_pos[self._hand_mocap], self.data.mocap_quat[self._hand_mocap] = home[:3], home[3:]
        self.data.qpos[self._finger_qpos] = scene.FINGER_MAX
        self._gripper_target = 1.0
        self.data.ctrl[self._gripper_ctrl] = scene.FINGER_MAX
        for i in range(scene.N_BLOCKS):
            adr = self._block_qpos[i]
            self.data.qpos[adr:adr + 3] = [*ep.block_xy[i], scene.BLOCK_HALF + 0.0005]
            self.data.qpos[adr + 3:adr + 7] = transforms3d.euler.euler2quat(0, 0, ep.block_yaw[i], "sxyz")
            self.model.geom_rgba[self._block_geom[i]] = scene.COLORS[ep.block_colors[i]]
        self.model.geom_rgba[self._pad_geom] = scene.COLORS[ep.pad_color]
        if self.scene_colors == "varied":
            self.model.geom_rgba[self._backdrop_geoms] = scene.varied_backdrop(ep.seed)
        if self.embodiment_colors == "varied":
            skin, sleeve = scene.varied_hand(ep.seed)
            finger = np.array([*(skin[:3] * scene.FINGER_SHADE), 1.0])
            for geoms, rgba in zip(self._hand_geoms, (skin, finger, sleeve)):
                self.model.geom_rgba[geoms] = rgba
        self.data.mocap_pos[self._pad_mocap] = [*ep.pad_xy, 0.0]
        mujoco.mj_forward(self.model, self.data)
        self.servo.reset()
        self.episode = ep
        # let the blocks settle on the table
        for _ in range(25):
            mujoco.mj_step(self.model, self.data)
        return self.observe()

    # ----------------------------------------------------------------- control
    def command(self, twist: np.ndarray, gripper: float | None = None) -> None:
        """Twist [vx vy vz wx wy wz] in the base frame (m/s, rad/s); gripper 0 closed .. 1 open."""
        self.servo.command(twist, self.data.time)
        if gripper is not None:
            self.set_gripper(gripper)

    def set_gripper(self, opening: float) -> None:
        if not np.isfinite(opening):
            raise ValueError("gripper command is NaN or inf")
        self._gripper_target = float(np.clip(opening, 0.0, 1.0))
        self.data.ctrl[self._gripper_ctrl] = self._gripper_target * scene.FINGER_MAX

    def advance(self, seconds: float) -> None:
        """Run physics for seconds, updating the servo every SERVO_DT."""
        n_servo = max(1, int(round(seconds / SERVO_DT)))
        substeps = int(round(SERVO_DT / PHYSICS_DT))
        for _ in range(n_servo):
            if self.embodiment == "panda":
                self.data.ctrl[:7] = self.servo.update(SERVO_DT, self.data.time)
            else:
                target = self.servo.update(SERVO_DT, self.data.time)
                self.data.mocap_pos[self._hand_mocap], self.data.mocap_quat[self._hand_mocap] = target[:3], target[3:]
            for _ in range(substeps):
                mujoco.mj_step(self.model, self.data)

    def step(self, twist: np.ndarray, gripper: float, seconds: float = 0.1) -> Observation:
        """Command a twist and gripper, hold it for seconds, return the new observation."""
        self.command(twist, gripper)
        self.advance(seconds)
        return self.observe()

    # ----------------------------------------------------------------- sensing
    def observe(self) -> Observation:
        d = self.data
        tcp_pos = d.site_xpos[self._tcp_site].copy()
        quat = np.empty(4)
        mujoco.mju_mat2Quat(quat, d.site_xmat[self._tcp_site])
        block_pos = np.stack([d.qpos[a:a + 3] for a in self._block_qpos]).copy()
        block_quat = np.stack([d.qpos[a + 3:a + 7] for a in self._block_qpos]).copy()
        opening = float(np.clip(d.qpos[self._finger_qpos].sum() / (2 * scene.FINGER_MAX), 0.0, 1.0))
        success = tasks.is_success(self.episode, block_pos, tcp_pos, opening) if self.episode else False
        return Observation(time=float(d.time), tcp_pos=tcp_pos, tcp_quat=quat, gripper_opening=opening,
                           joint_names=self._joint_names, joint_pos=d.qpos[self._joint_qpos].copy(),
                           joint_vel=d.qvel[self._joint_dof].copy(), block_pos=block_pos,
                           block_quat=block_quat, success=success)

    def render(self, camera: str = "front") -> np.ndarray:
        """RGB image (H, W, 3) uint8 from a camera."""
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.image_height, self.image_width)
        self._renderer.update_scene(self.data, camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
