"""``lapa_sim_arm``: the simulated arm as a ROS 2 node, standing in for a real arm + MoveIt Servo.

Subscribes
    <twist_topic>   geometry_msgs/TwistStamped   EE twist, as MoveIt Servo's delta_twist_cmds
    <gripper_topic> std_msgs/Float64             gripper opening, 0 closed .. 1 fully open
Publishes
    <image_topic>, <camera_info_topic>  sensor_msgs/Image (rgb8) + CameraInfo, sensor-data QoS
    /joint_states                        sensor_msgs/JointState
    <ee_pose_topic>                      geometry_msgs/PoseStamped of the TCP in the base frame
    /tf, /tf_static                      tf2_msgs/TFMessage of the links (publish_tf: where no
                                         robot_state_publisher runs)
    ~/object_poses                       geometry_msgs/PoseArray of the blocks (for scripted experts)
    ~/episode                            std_msgs/String (JSON: task, seed, instruction; latched)
    ~/success                            std_msgs/Bool, whether the episode's goal holds now
    <servo_node>/status                  moveit_msgs/ServoStatus (JOINT_BOUND when halted at a joint limit)
Services
    ~/reset                              lapa_interfaces/srv/ResetEpisode (task, seed, instruction set)
    <servo_node>/switch_command_type     moveit_msgs/srv/ServoCommandType, as MoveIt Servo
    <servo_node>/pause_servo             std_srvs/srv/SetBool, as MoveIt Servo

Twists are applied like Servo applies them: in the header's frame (the base frame or the TCP
frame), speed-limited, mapped through a damped least-squares Jacobian, and halted when no command
arrived for ``command_timeout`` seconds. With ``servo_handshake`` the arm also asks what MoveIt Servo
asks (lapa_sim/servo_handshake.py): TWIST mode and unpaused first, and fresh header stamps.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import rclpy
import transforms3d
from geometry_msgs.msg import Pose, PoseArray, PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.time import Time
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import SetBool

from lapa_core.node_params import SIM_ARM
from lapa_sim import scene, tasks
from lapa_sim.env import TabletopEnv
from lapa_sim.servo import ServoLimits
from lapa_sim.servo_handshake import ServoHandshake, status_of
from lapa_policy_node.runtime import ConfigError, declare_params, validate_topic


class SimArmNode(Node):
    def __init__(self, **kwargs):
        super().__init__("lapa_sim_arm", **kwargs)
        p = self._declare_parameters()
        self.base_frame = p["base_frame"]
        self.tcp_frame = scene.TCP_BODY
        limits = ServoLimits(max_linear_speed=p["max_linear_speed"], max_angular_speed=p["max_angular_speed"],
                             command_timeout=p["command_timeout"])
        self.env = TabletopEnv(image_size=(p["image_height"], p["image_width"]), servo_limits=limits)
        self.env.reset(p["task"], p["seed"])
        self.camera_frame = p["camera_frame"]

        self.create_subscription(TwistStamped, p["twist_topic"], self._on_twist, 10)
        self.create_subscription(Float64, p["gripper_topic"], self._on_gripper, 10)
        self.image_pub = self.create_publisher(Image, p["image_topic"], qos_profile_sensor_data)
        self.info_pub = self.create_publisher(CameraInfo, p["camera_info_topic"], qos_profile_sensor_data)
        self.joint_pub = self.create_publisher(JointState, "/joint_states", 10)
        self.pose_pub = self.create_publisher(PoseStamped, p["ee_pose_topic"], 10)
        self.objects_pub = self.create_publisher(PoseArray, "~/object_poses", 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.episode_pub = self.create_publisher(String, "~/episode", latched)
        self.success_pub = self.create_publisher(Bool, "~/success", 10)
        from lapa_interfaces.srv import ResetEpisode  # built by setup.sh into the venv

        self.create_service(ResetEpisode, "~/reset", self._on_reset)

        self._tf = _LinkTransforms(self, self.env) if p["publish_tf"] else None
        self.handshake = ServoHandshake(p["servo_handshake"], p["incoming_command_timeout"])
        self._servo_status = self._make_servo_interface(p)
        self._last_tick = time.monotonic()
        self._sim_seconds = 0.0
        self._wall_start = self._last_tick
        self.create_timer(1.0 / p["physics_rate"], self._tick_physics)
        self.create_timer(1.0 / p["state_rate"], self._publish_state)
        self.create_timer(1.0 / p["camera_rate"], self._publish_camera)
        self._publish_episode()
        self.get_logger().info(
            f"simulated arm ready: task '{self.env.episode.task}' seed {self.env.episode.seed} "
            f"('{self.env.episode.instruction}'); twists on {p['twist_topic']}, camera on {p['image_topic']}")

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> dict:
        p = declare_params(self, SIM_ARM)
        try:
            tasks.check_task(p["task"])
        except tasks.UnknownTaskError as e:
            raise ConfigError(f"parameter 'task': {e}") from None
        for key in ("twist_topic", "gripper_topic", "image_topic", "camera_info_topic", "ee_pose_topic"):
            validate_topic(self, key, p[key])
        return p

    def _make_servo_interface(self, p):
        """MoveIt Servo's services and status topic under servo_node; None where moveit_msgs is missing."""
        try:
            from moveit_msgs.msg import ServoStatus
            from moveit_msgs.srv import ServoCommandType
        except ImportError:
            if p["servo_handshake"]:
                raise ConfigError("parameter 'servo_handshake': moveit_msgs is not installed (./setup.sh builds "
                                  "its Servo definitions into the venv)") from None
            return None
        servo = validate_topic(self, "servo_node", p["servo_node"]).rstrip("/")
        self.create_service(ServoCommandType, f"{servo}/switch_command_type", self._on_switch_command_type)
        self.create_service(SetBool, f"{servo}/pause_servo", self._on_pause_servo)
        self._status_msg = ServoStatus
        return self.create_publisher(ServoStatus, f"{servo}/status", 10)

    def _on_switch_command_type(self, request, response):
        response.success = self.handshake.switch(int(request.command_type))
        self.get_logger().info(f"servo command type {request.command_type}: "
                               f"{'switched' if response.success else 'refused'}")
        return response

    def _on_pause_servo(self, request, response):
        self.handshake.pause(request.data)
        response.success, response.message = True, "paused" if request.data else "running"
        self.get_logger().info(f"servo {response.message}")
        return response

    # ------------------------------------------------------------------ inputs
    def _on_twist(self, msg: TwistStamped) -> None:
        age = (self.get_clock().now() - Time.from_msg(msg.header.stamp)).nanoseconds * 1e-9
        refusal = self.handshake.refusal(age)
        if refusal:
            self.get_logger().warn(f"dropping twist: {refusal}", throttle_duration_sec=1.0)
            return
        t = msg.twist
        twist = np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])
        if not np.all(np.isfinite(twist)):
            self.get_logger().warn("ignoring twist with NaN/inf", throttle_duration_sec=1.0)
            return
        frame = msg.header.frame_id
        if frame in ("", self.base_frame):
            pass
        elif frame == self.tcp_frame:
            rot = transforms3d.quaternions.quat2mat(self.env.observe().tcp_quat)
            twist = np.concatenate([rot @ twist[:3], rot @ twist[3:]])
        else:
            self.get_logger().warn(
                f"ignoring twist in unknown frame '{frame}' (use '{self.base_frame}' or '{self.tcp_frame}')",
                throttle_duration_sec=1.0)
            return
        self.env.command(twist)

    def _on_gripper(self, msg: Float64) -> None:
        if not math.isfinite(msg.data):
            self.get_logger().warn("ignoring NaN/inf gripper command", throttle_duration_sec=1.0)
            return
        self.env.set_gripper(msg.data)

    def _on_reset(self, request, response):
        task = request.task or self.env.episode.task
        try:
            self.env.reset(task, int(request.seed), request.instruction_set or "train")
        except ValueError as e:  # unknown task or instruction set
            response.success, response.message = False, str(e)
            return response
        self._publish_episode()
        response.success = True
        response.instruction = self.env.episode.instruction
        response.message = f"reset to {task} seed {request.seed}"
        self.get_logger().info(f"{response.message}: '{response.instruction}'")
        return response

    # ------------------------------------------------------------------ outputs
    def _tick_physics(self) -> None:
        now = time.monotonic()
        elapsed = min(now - self._last_tick, 0.05)  # after a stall, do not fast-forward the world
        self._last_tick = now
        self.env.advance(elapsed)
        self._sim_seconds += elapsed

    def _publish_state(self) -> None:
        obs = self.env.observe()
        stamp = self.get_clock().now().to_msg()
        js = JointState()
        js.header.stamp = stamp
        js.name = list(obs.joint_names)
        js.position = obs.joint_pos.tolist()
        js.velocity = obs.joint_vel.tolist()
        self.joint_pub.publish(js)

        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, self.base_frame
        pose.pose = _pose(obs.tcp_pos, obs.tcp_quat)
        self.pose_pub.publish(pose)

        objects = PoseArray()
        objects.header = pose.header
        objects.poses = [_pose(p, q) for p, q in zip(obs.block_pos, obs.block_quat)]
        self.objects_pub.publish(objects)
        self.success_pub.publish(Bool(data=obs.success))
        if self._tf is not None:
            self._tf.publish(stamp)
        if self._servo_status is not None:
            code, message = status_of(self.env.servo.halted_reason)
            self._servo_status.publish(self._status_msg(code=code, message=message))

    def _publish_camera(self) -> None:
        rgb = self.env.render("front")
        h, w = rgb.shape[:2]
        img = Image()
        img.header.stamp = self.get_clock().now().to_msg()
        img.header.frame_id = self.camera_frame
        img.height, img.width, img.encoding, img.is_bigendian, img.step = h, w, "rgb8", 0, 3 * w
        img.data = rgb.tobytes()
        self.image_pub.publish(img)
        self.info_pub.publish(_camera_info(img.header, w, h, scene.FRONT_CAMERA.fovy))

    def _publish_episode(self) -> None:
        ep = self.env.episode
        info = {"task": ep.task, "seed": ep.seed, "instruction": ep.instruction,
                "target_color": ep.color, "pad_color": ep.pad_color, "direction": ep.direction,
                "block_colors": ep.block_colors}
        self.episode_pub.publish(String(data=json.dumps(info)))


class _LinkTransforms:
    """/tf and /tf_static of the arm's links from the simulator, as robot_state_publisher publishes them:
    the edges of fixed joints once on /tf_static (latched), the others on /tf."""

    def __init__(self, node: Node, env: TabletopEnv):
        import mujoco

        from lapa_policy_node.runtime import ConfigError

        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            raise ConfigError("parameter 'publish_tf': tf2_msgs is not installed (./setup.sh builds it into the "
                              "venv; on ROS 2, install ros-<distro>-tf2-msgs)") from None
        self._mujoco, self._msg = mujoco, TFMessage
        self.model, self.env = env.model, env
        self.data = mujoco.MjData(env.model)  # a scratch copy: the simulation's own data stays untouched
        m = env.model
        base = m.body(scene.BASE_FRAME).id
        below = {base}
        self.edges = []  # (parent id, child id, static)
        for b in range(m.nbody):  # MuJoCo orders bodies parents first
            if int(m.body_parentid[b]) in below and b != base:
                below.add(b)
                self.edges.append((int(m.body_parentid[b]), b, int(m.body_jntnum[b]) == 0))
        self.pub = node.create_publisher(TFMessage, "/tf", 100)
        self.static_pub = node.create_publisher(
            TFMessage, "/tf_static", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.static_pub.publish(TFMessage(transforms=self._transforms(node.get_clock().now().to_msg(), True)))

    def _transforms(self, stamp, static: bool) -> list:
        from geometry_msgs.msg import TransformStamped

        self.data.qpos[:] = self.env.data.qpos
        self._mujoco.mj_kinematics(self.model, self.data)  # link poses of the current joint positions
        out = []
        for parent, child, fixed in self.edges:
            if fixed != static:
                continue
            r_p, r_c = self.data.xmat[parent].reshape(3, 3), self.data.xmat[child].reshape(3, 3)
            rot = r_p.T @ r_c
            pos = r_p.T @ (self.data.xpos[child] - self.data.xpos[parent])
            t = TransformStamped()
            t.header.stamp, t.header.frame_id, t.child_frame_id = stamp, self.model.body(parent).name, \
                self.model.body(child).name
            t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = map(float, pos)
            w, x, y, z = transforms3d.quaternions.mat2quat(rot)
            t.transform.rotation.w, t.transform.rotation.x = float(w), float(x)
            t.transform.rotation.y, t.transform.rotation.z = float(y), float(z)
            out.append(t)
        return out

    def publish(self, stamp) -> None:
        self.pub.publish(self._msg(transforms=self._transforms(stamp, False)))


def _pose(pos, quat_wxyz) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in pos)
    pose.orientation.w, pose.orientation.x, pose.orientation.y, pose.orientation.z = (float(v) for v in quat_wxyz)
    return pose


def _camera_info(header, width: int, height: int, fovy_deg: float) -> CameraInfo:
    """Pinhole intrinsics of a MuJoCo camera (square pixels, vertical field of view fovy)."""
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    info = CameraInfo()
    info.header = header
    info.width, info.height = width, height
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def main(args=None) -> int:
    from lapa_policy_node.runtime import run_node

    return run_node(SimArmNode, args)


if __name__ == "__main__":
    sys.exit(main())
