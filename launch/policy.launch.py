"""The policy action server + robot_state_publisher, for a real arm behind MoveIt Servo.

    ros2 launch lapa_ros policy.launch.py checkpoint:=/path/to/policy image_topic:=/wrist/image_raw

With autostart:=false the server is a managed lifecycle node that waits: `ros2 lifecycle set
/lapa_policy_server configure`, then `activate` (or let a lifecycle manager do it).

Then send goals:
    ros2 action send_goal /lapa_policy_server/follow_instruction lapa_interfaces/action/FollowInstruction \
        "{instruction: 'pick up the red block'}" --feedback
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = Path(get_package_share_directory("lapa_ros"))
    urdf = (share / "urdf" / "lapa_panda.urdf").read_text()
    params = str(share / "config" / "policy_server.yaml")
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", description="finetuned policy directory"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="camera topic"),
        DeclareLaunchArgument("twist_topic", default_value="/servo_node/delta_twist_cmds",
                              description="MoveIt Servo TwistStamped input"),
        DeclareLaunchArgument("control_rate", default_value="0.0", description="Hz; 0 = the policy's own"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate at launch; false = managed lifecycle node"),
        Node(package="lapa_ros", executable="lapa_policy_server", name="lapa_policy_server", output="screen",
             parameters=[params, {"checkpoint": arg("checkpoint"), "image_topic": arg("image_topic"),
                                  "twist_topic": arg("twist_topic"), "control_rate": arg("control_rate"),
                                  "autostart": arg("autostart")}]),
        Node(package="robot_state_publisher", executable="robot_state_publisher", output="screen",
             parameters=[{"robot_description": urdf}]),
    ])
