"""The MuJoCo tabletop scene: the arm from ``urdf/``, a table, coloured blocks, a target pad, cameras.

The arm is read from the same URDF that robot_state_publisher reads, and the scene is added
around it with ``mujoco.MjSpec``. The model is fixed for the life of a simulator; what changes
between episodes (object colours, poses, which pad) is set on ``MjData``/``MjModel`` fields at
reset, so renderers and ROS publishers never need rebuilding.

Embodiments: ``panda`` (the default, the arm above) and ``floating_gripper``, a stand-in for "videos
of another embodiment": a skin-coloured two-finger hand with a blue sleeve and no arm, floating
free (a free body welded to a mocap target that the servo moves), over a pale table. Its tool
centre point, finger geometry and gripper actuator match the Panda's, so the same twists and
gripper commands, and the same scripted expert, work on both; the world and cameras are the same.
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

EMBODIMENTS = ("panda", "floating_gripper")
# "fixed": the embodiment's own table and floor; "varied": both recoloured per episode from its seed
# (muted colours, so the saturated blocks and pad stand out), as videos of people come from many rooms
SCENE_COLORS = ("fixed", "varied")
# "fixed": the embodiment's own colours; "varied" (floating gripper only): a skin tone and a sleeve
# colour per episode from its seed, as videos of people show many people: one hand's video does not
# transfer to the arm, many hands' does (docs/lab-notes/other-embodiment-transfer.md)
EMBODIMENT_COLORS = ("fixed", "varied")

TABLE_SIZE = (0.45, 0.6)  # half extents in x, y (m) of the table top around its centre
TABLE_CENTER_X = 0.45


@dataclass(frozen=True)
class CameraSpec:
    name: str
    pos: tuple[float, float, float]
    lookat: tuple[float, float, float]
    fovy: float = 50.0


# Steep and close, so the workspace fills most of a 64 px frame and motion along x is visible to the
# LAQ (docs/lab-notes/laq.md)
FRONT_CAMERA = CameraSpec("front", pos=(0.85, 0.0, 0.90), lookat=(0.48, 0.0, 0.06), fovy=40.0)


def _look_at_xyaxes(pos, lookat):
    """MuJoCo camera axes (x right, y up; the camera looks along -z) for a camera at pos."""
    forward = np.asarray(lookat, float) - np.asarray(pos, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.concatenate([right, up])


def check_embodiment(name: str) -> str:
    if name not in EMBODIMENTS:
        raise ValueError(f"unknown embodiment '{name}'; known: {', '.join(EMBODIMENTS)}")
    return name


def check_scene_colors(name: str) -> str:
    if name not in SCENE_COLORS:
        raise ValueError(f"unknown scene colours '{name}'; known: {', '.join(SCENE_COLORS)}")
    return name


def check_embodiment_colors(name: str, embodiment: str) -> str:
    if name not in EMBODIMENT_COLORS:
        raise ValueError(f"unknown embodiment colours '{name}'; known: {', '.join(EMBODIMENT_COLORS)}")
    if name == "varied" and embodiment != "floating_gripper":
        raise ValueError(f"varied embodiment colours are for the floating gripper (videos of many people); "
                         f"the {embodiment} keeps its own")
    return name


def varied_hand(seed: int) -> np.ndarray:
    """RGBA of the floating gripper's skin and sleeve (2 x 4) for an episode seed, under
    embodiment_colors="varied": a skin tone (hue 0.02-0.11, orange-brown; from pale to dark), and a
    sleeve of any hue, muted (saturation <= 0.5), from near black to near white."""
    import colorsys

    rng = np.random.default_rng([seed, 0x4A9D])
    skin = colorsys.hsv_to_rgb(rng.uniform(0.02, 0.11), rng.uniform(0.25, 0.65), rng.uniform(0.3, 0.95))
    sleeve = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.12, 0.95))
    return np.array([[*skin, 1.0], [*sleeve, 1.0]])


def varied_backdrop(seed: int) -> np.ndarray:
    """RGBA of the table and the floor (2 x 4) for an episode seed, under scene_colors="varied":
    any hue, muted (saturation <= 0.4, below every block colour's), the table lighter than the floor."""
    import colorsys

    rng = np.random.default_rng([seed, 0x5CE4E])
    table = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.45, 0.9))
    floor = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.4))
    return np.array([[*table, 1.0], [*floor, 1.0]])


def _set_options(spec: mujoco.MjSpec) -> None:
    """Physics and rendering options shared by every embodiment."""
    spec.modelname = "lapa_tabletop"
    spec.compiler.fusestatic = False  # keep the TCP and camera links as bodies
    spec.option.timestep = 0.002
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0
    spec.option.noslip_iterations = 2
    spec.visual.global_.offwidth = 640
    spec.visual.global_.offheight = 480


def build_spec(urdf_path: Path = URDF_PATH) -> mujoco.MjSpec:
    """Return the scene's MjSpec: URDF arm + actuators + table, blocks, pad, lights, cameras."""
    if not urdf_path.is_file():
        raise FileNotFoundError(f"robot description not found: {urdf_path}")
    spec = mujoco.MjSpec.from_file(str(urdf_path))
    _set_options(spec)

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
            _finger_pad(geom)

    _add_world(spec)
    _add_actuators(spec)
    tcp = spec.body(TCP_BODY)
    tcp.add_site(name="tcp", size=[0.005, 0, 0], rgba=[1, 0, 0, 0], group=5)
    cam_body = spec.body("panda_wrist_camera_link")
    # MuJoCo cameras look along their -z axis; the link's +z looks along the hand.
    cam_body.add_camera(name="wrist", fovy=70.0, quat=[0.0, 1.0, 0.0, 0.0])
    return spec


def _finger_pad(geom) -> None:
    geom.friction = [1.5, 0.02, 0.001]
    geom.condim = 4
    geom.solref = [0.01, 1.0]


def _add_world(spec: mujoco.MjSpec, table_rgba=(0.62, 0.52, 0.40, 1), floor_rgba=(0.3, 0.32, 0.35, 1)) -> None:
    world = spec.worldbody
    world.add_light(name="key", pos=[0.6, -0.6, 1.6], dir=[-0.1, 0.4, -1.0], diffuse=[0.7, 0.7, 0.7],
                    castshadow=False)
    world.add_light(name="fill", pos=[1.2, 0.8, 1.2], dir=[-0.6, -0.5, -0.6], diffuse=[0.35, 0.35, 0.35],
                    castshadow=False)
    world.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[3, 3, 0.1], pos=[0, 0, -0.75],
                   rgba=list(floor_rgba), contype=_WORLD_CONTYPE, conaffinity=_WORLD_CONAFF)
    world.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX,
                   size=[TABLE_SIZE[0], TABLE_SIZE[1], 0.02], pos=[TABLE_CENTER_X, 0, -0.02],
                   rgba=list(table_rgba), friction=[0.6, 0.005, 0.0001],
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
    _add_gripper_actuator(spec, FINGER_JOINTS[0])


def _add_gripper_actuator(spec: mujoco.MjSpec, joint: str) -> None:
    act = spec.add_actuator(name="gripper_pos", target=joint, trntype=mujoco.mjtTrn.mjTRN_JOINT)
    act.gaintype = mujoco.mjtGain.mjGAIN_FIXED
    act.biastype = mujoco.mjtBias.mjBIAS_AFFINE
    act.gainprm[0] = 800.0
    act.biasprm[1] = -800.0
    act.biasprm[2] = -20.0
    act.forcelimited = True
    act.forcerange = [-15.0, 15.0]  # N: a firm grip that cannot crush the scene


# ---------------------------------------------------------------- the floating gripper
HAND_BODY = "hand"  # free body; its frame is the TCP frame (z from the palm towards the fingertips)
HAND_TARGET = "hand_target"  # mocap body the hand is welded to; the servo moves it
HAND_FREE_JOINT = "hand_free"
HAND_FINGER_JOINTS = ("hand_finger_joint1", "hand_finger_joint2")
# The Panda's TCP pose at HOME_Q (base frame): the hand starts where the arm's TCP starts.
HOME_TCP_POS = (0.4635, 0.0, 0.4028)
HOME_TCP_QUAT = (0.0, 1.0, 0.0, 0.0)  # w x y z: pointing down
HAND_RGBA = (0.93, 0.72, 0.58, 1.0)  # skin
FINGER_RGBA = (0.86, 0.62, 0.50, 1.0)
SLEEVE_RGBA = (0.16, 0.36, 0.78, 1.0)  # blue cuff and sleeve
# the hand's geoms by what they are, for embodiment_colors="varied" (fingers a shade darker than the skin)
HAND_SKIN_GEOMS = ("palm", "knuckles", "thumb")
HAND_FINGER_GEOMS = ("hand_leftfinger", "hand_leftfinger_tip", "hand_rightfinger", "hand_rightfinger_tip")
HAND_SLEEVE_GEOMS = ("cuff", "sleeve")
FINGER_SHADE = 0.92
HAND_TABLE_RGBA = (0.66, 0.70, 0.68, 1.0)  # pale grey-green counter instead of the wooden table
HAND_FLOOR_RGBA = (0.42, 0.36, 0.30, 1.0)
# Distances along the TCP z axis, chosen as on the Panda: fingers slide from 0.045 m above the TCP
# and their tips end 0.012 m past it, their inner faces on the joints' zero planes.
_FINGER_BASE = -0.045
_FINGER_HALF = (0.011, 0.008, 0.027)


def build_floating_gripper_spec() -> mujoco.MjSpec:
    """The same world with a floating two-finger hand (no arm) instead of the Panda."""
    spec = mujoco.MjSpec()
    _set_options(spec)
    _add_world(spec, table_rgba=HAND_TABLE_RGBA, floor_rgba=HAND_FLOOR_RGBA)
    world = spec.worldbody
    target = world.add_body(name=HAND_TARGET, mocap=True, pos=list(HOME_TCP_POS), quat=list(HOME_TCP_QUAT))
    target.add_site(name="hand_target", size=[0.005, 0, 0], rgba=[0, 0, 1, 0], group=5)

    hand = world.add_body(name=HAND_BODY, pos=list(HOME_TCP_POS), quat=list(HOME_TCP_QUAT), gravcomp=1.0)
    hand.add_freejoint(name=HAND_FREE_JOINT)
    collide = dict(contype=_ARM_CONTYPE, conaffinity=_ARM_CONAFF)
    visual = dict(contype=0, conaffinity=0)
    # palm: a rounded slab across the finger direction (y), knuckles along its lower edge
    hand.add_geom(name="palm", type=mujoco.mjtGeom.mjGEOM_BOX, size=[0.03, 0.05, 0.022], pos=[0, 0, -0.068],
                  rgba=list(HAND_RGBA), mass=0.35, **collide)
    hand.add_geom(name="knuckles", type=mujoco.mjtGeom.mjGEOM_CAPSULE, size=[0.024, 0.05, 0],
                  pos=[0, 0, -0.05], quat=[0.7071068, 0.7071068, 0, 0], rgba=list(HAND_RGBA), mass=0.05, **visual)
    hand.add_geom(name="thumb", type=mujoco.mjtGeom.mjGEOM_CAPSULE, size=[0.011, 0.022, 0],
                  pos=[-0.034, 0.02, -0.06], quat=[0.9238795, 0.3826834, 0, 0], rgba=list(FINGER_RGBA), mass=0.02,
                  **visual)
    hand.add_geom(name="cuff", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[0.036, 0.012, 0], pos=[0, 0, -0.1],
                  rgba=list(SLEEVE_RGBA), mass=0.05, **visual)
    hand.add_geom(name="sleeve", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[0.032, 0.06, 0], pos=[0, 0, -0.17],
                  rgba=list(SLEEVE_RGBA), mass=0.1, **visual)
    hand.add_site(name="tcp", size=[0.005, 0, 0], rgba=[1, 0, 0, 0], group=5)
    # the wrist camera where the Panda's sits relative to its TCP (hand link + (0.07, 0, 0), pitched 0.3 rad)
    cam_quat = np.empty(4)
    mujoco.mju_mulQuat(cam_quat, np.array([np.cos(-0.15), 0.0, np.sin(-0.15), 0.0]), np.array([0.0, 1.0, 0.0, 0.0]))
    hand.add_camera(name="wrist", fovy=70.0, pos=[0.07, 0, -0.1034], quat=list(cam_quat))

    for name, joint, sign in (("hand_leftfinger", HAND_FINGER_JOINTS[0], 1.0),
                              ("hand_rightfinger", HAND_FINGER_JOINTS[1], -1.0)):
        finger = hand.add_body(name=name, pos=[0, 0, _FINGER_BASE], gravcomp=1.0)
        finger.add_joint(name=joint, type=mujoco.mjtJoint.mjJNT_SLIDE, axis=[0, sign, 0], range=[0.0, FINGER_MAX],
                         armature=0.01, damping=[0.5, 0.0, 0.0])
        hx, hy, hz = _FINGER_HALF
        pad = finger.add_geom(name=name, type=mujoco.mjtGeom.mjGEOM_BOX, size=[hx, hy, hz],
                              pos=[0, sign * hy, hz + 0.003], rgba=list(FINGER_RGBA), mass=0.015, **collide)
        _finger_pad(pad)
        finger.add_geom(name=f"{name}_tip", type=mujoco.mjtGeom.mjGEOM_CAPSULE, size=[hy, hx - hy, 0],
                        pos=[0, sign * hy, 2 * hz + 0.003 - hy], quat=[0.7071068, 0, 0.7071068, 0],
                        rgba=list(FINGER_RGBA), mass=0.001, **visual)  # rounded fingertip

    spec.add_equality(name="hand_weld", type=mujoco.mjtEq.mjEQ_WELD, objtype=mujoco.mjtObj.mjOBJ_BODY,
                      name1=HAND_BODY, name2=HAND_TARGET, solref=[0.01, 1.0],
                      data=_eq_data([0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]))  # anchor, relative pose (identity), torquescale
    # the second finger mirrors the first, like the URDF's mimic joint
    spec.add_equality(name="hand_finger_mimic", type=mujoco.mjtEq.mjEQ_JOINT, objtype=mujoco.mjtObj.mjOBJ_JOINT,
                      name1=HAND_FINGER_JOINTS[1], name2=HAND_FINGER_JOINTS[0], data=_eq_data([0, 1, 0, 0, 0]))
    _add_gripper_actuator(spec, HAND_FINGER_JOINTS[0])
    return spec


def _eq_data(values) -> list[float]:
    return [float(v) for v in values] + [0.0] * (mujoco.mjNEQDATA - len(values))


def build_model(urdf_path: Path = URDF_PATH, embodiment: str = "panda") -> mujoco.MjModel:
    if check_embodiment(embodiment) == "floating_gripper":
        return build_floating_gripper_spec().compile()
    return build_spec(urdf_path).compile()
