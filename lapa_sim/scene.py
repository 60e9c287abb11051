"""The MuJoCo tabletop scene: the arm from ``urdf/``, a table, coloured blocks, a target pad, cameras.

The arm is read from the same URDF that robot_state_publisher reads, and the scene is added
around it with ``mujoco.MjSpec``. The model is fixed for the life of a simulator; what changes
between episodes (object colours, poses, which pad) is set on ``MjData``/``MjModel`` fields at
reset, so renderers and ROS publishers never need rebuilding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

from lapa_sim.resources import share_file

URDF_PATH = share_file("urdf", "lapa_panda.urdf")

BASE_FRAME = "panda_link0"
TCP_BODY = "panda_hand_tcp"
ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
FINGER_MAX = 0.04  # m, each finger; the opening between the pads is twice the joint position
HOME_Q = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 1.9, 0.785398])

N_BLOCKS = 3
BLOCK_HALF = 0.022  # m, half edge of a block (4.4 cm cubes)
PAD_RADIUS = 0.06
PAD_HALF_HEIGHT = 0.002

# Colour names used in instructions and their RGBA.
COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.10, 1.0),
    "green": (0.15, 0.70, 0.20, 1.0),
    "blue": (0.12, 0.30, 0.90, 1.0),
    "yellow": (0.95, 0.85, 0.10, 1.0),
    "purple": (0.55, 0.20, 0.75, 1.0),
}

# Collision groups: arm geoms touch the world and objects but not each other.
_ARM_CONTYPE, _ARM_CONAFF = 2, 1
_WORLD_CONTYPE, _WORLD_CONAFF = 1, 3

TABLE_SIZE = (0.45, 0.6)  # half extents in x, y (m) of the table top around its centre
TABLE_CENTER_X = 0.45


@dataclass(frozen=True)
class CameraSpec:
    name: str
    pos: tuple[float, float, float]
    lookat: tuple[float, float, float]
    fovy: float = 50.0


FRONT_CAMERA = CameraSpec("front", pos=(1.1, 0.0, 0.75), lookat=(0.45, 0.0, 0.08), fovy=50.0)


def _look_at_xyaxes(pos, lookat):
    """MuJoCo camera axes (x right, y up; the camera looks along -z) for a camera at pos."""
    forward = np.asarray(lookat, float) - np.asarray(pos, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.concatenate([right, up])


def build_spec(urdf_path: Path = URDF_PATH) -> mujoco.MjSpec:
    """Return the scene's MjSpec: URDF arm + actuators + table, blocks, pad, lights, cameras."""
    if not urdf_path.is_file():
        raise FileNotFoundError(f"robot description not found: {urdf_path}")
    spec = mujoco.MjSpec.from_file(str(urdf_path))
    spec.modelname = "lapa_tabletop"
    spec.compiler.fusestatic = False  # keep the TCP and camera links as bodies
    spec.option.timestep = 0.002
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0
    spec.option.noslip_iterations = 2
    spec.visual.global_.offwidth = 640
    spec.visual.global_.offheight = 480

    for body in spec.bodies:
        if body.name.startswith("panda_"):
            body.gravcomp = 1.0  # the real arm's controller compensates gravity too
    for geom in spec.geoms:
        geom.contype, geom.conaffinity = _ARM_CONTYPE, _ARM_CONAFF
    for joint in spec.joints:
        joint.armature = 0.1 if joint.name in ARM_JOINTS else 0.01
        joint.damping = [2.0 if joint.name in ARM_JOINTS else 0.5, 0.0, 0.0]

    # Finger pads: high friction, torsional friction so grasped blocks do not spin.
    for name in ("panda_leftfinger", "panda_rightfinger"):
        for geom in spec.body(name).geoms:
            geom.friction = [1.5, 0.02, 0.001]
            geom.condim = 4
            geom.solref = [0.01, 1.0]

    _add_world(spec)
    _add_actuators(spec)
    tcp = spec.body(TCP_BODY)
    tcp.add_site(name="tcp", size=[0.005, 0, 0], rgba=[1, 0, 0, 0], group=5)
    cam_body = spec.body("panda_wrist_camera_link")
    # MuJoCo cameras look along their -z axis; the link's +z looks along the hand.
    cam_body.add_camera(name="wrist", fovy=70.0, quat=[0.0, 1.0, 0.0, 0.0])
    return spec


def _add_world(spec: mujoco.MjSpec) -> None:
    world = spec.worldbody
    world.add_light(name="key", pos=[0.6, -0.6, 1.6], dir=[-0.1, 0.4, -1.0], diffuse=[0.7, 0.7, 0.7],
                    castshadow=False)
    world.add_light(name="fill", pos=[1.2, 0.8, 1.2], dir=[-0.6, -0.5, -0.6], diffuse=[0.35, 0.35, 0.35],
                    castshadow=False)
    world.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[3, 3, 0.1], pos=[0, 0, -0.75],
                   rgba=[0.3, 0.32, 0.35, 1], contype=_WORLD_CONTYPE, conaffinity=_WORLD_CONAFF)
    world.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX,
                   size=[TABLE_SIZE[0], TABLE_SIZE[1], 0.02], pos=[TABLE_CENTER_X, 0, -0.02],
                   rgba=[0.62, 0.52, 0.40, 1], friction=[0.6, 0.005, 0.0001],
                   contype=_WORLD_CONTYPE, conaffinity=_WORLD_CONAFF)

    for i in range(N_BLOCKS):
        block = world.add_body(name=f"block{i}", pos=[0.5, -0.2 + 0.2 * i, BLOCK_HALF])
        block.add_freejoint(name=f"block{i}_free")
        block.add_geom(name=f"block{i}", type=mujoco.mjtGeom.mjGEOM_BOX, size=[BLOCK_HALF] * 3,
                       mass=0.05, rgba=list(COLORS["red"]), friction=[1.0, 0.02, 0.001], condim=4,
                       contype=_WORLD_CONTYPE, conaffinity=_WORLD_CONAFF)

    pad = world.add_body(name="pad", mocap=True, pos=[0.5, 0.3, 0.0])
    pad.add_geom(name="pad", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[PAD_RADIUS, PAD_HALF_HEIGHT, 0],
                 pos=[0, 0, PAD_HALF_HEIGHT], rgba=list(COLORS["yellow"]), contype=4, conaffinity=0)  # touches nothing

    cam = FRONT_CAMERA
    camera = world.add_camera(name=cam.name, pos=list(cam.pos), fovy=cam.fovy)
    camera.alt.type = mujoco.mjtOrientation.mjORIENTATION_XYAXES
    camera.alt.xyaxes = list(_look_at_xyaxes(cam.pos, cam.lookat))


def _add_actuators(spec: mujoco.MjSpec) -> None:
    """Joint position servos, as a real arm's joint-impedance controller presents them."""
    for name in ARM_JOINTS:
        kp, kv = (3000.0, 120.0) if name in ARM_JOINTS[:4] else (1200.0, 40.0)
        act = spec.add_actuator(name=f"{name}_pos", target=name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        act.gaintype = mujoco.mjtGain.mjGAIN_FIXED
        act.biastype = mujoco.mjtBias.mjBIAS_AFFINE
        act.gainprm[0] = kp
        act.biasprm[1] = -kp
        act.biasprm[2] = -kv
        act.forcelimited = True
        act.forcerange = [-150.0, 150.0]
    act = spec.add_actuator(name="gripper_pos", target=FINGER_JOINTS[0], trntype=mujoco.mjtTrn.mjTRN_JOINT)
    act.gaintype = mujoco.mjtGain.mjGAIN_FIXED
    act.biastype = mujoco.mjtBias.mjBIAS_AFFINE
    act.gainprm[0] = 800.0
    act.biasprm[1] = -800.0
    act.biasprm[2] = -20.0
    act.forcelimited = True
    act.forcerange = [-15.0, 15.0]  # N: a firm grip that cannot crush the scene


def build_model(urdf_path: Path = URDF_PATH) -> mujoco.MjModel:
    return build_spec(urdf_path).compile()
