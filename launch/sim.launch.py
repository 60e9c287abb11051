"""Simulated arm + robot_state_publisher, both from urdf/lapa_panda.urdf (real ROS 2 installs).

    ros2 launch lapa_ros sim.launch.py task:=pick_place seed:=3

The same node graph runs without `launch` here via `lapa sim`; both read config/sim_arm.yaml.
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
    params = str(share / "config" / "sim_arm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("task", default_value="reach", description="reach, push or pick_place"),
        DeclareLaunchArgument("seed", default_value="0", description="layout seed of the first episode"),
        DeclareLaunchArgument("twist_topic", default_value="/servo_node/delta_twist_cmds",
                              description="TwistStamped input (MoveIt Servo's topic)"),
        Node(package="lapa_ros", executable="lapa_sim_arm", name="lapa_sim_arm", output="screen",
             parameters=[params, {"task": LaunchConfiguration("task"),
                                  "seed": LaunchConfiguration("seed"),
                                  "twist_topic": LaunchConfiguration("twist_topic")}]),
        Node(package="robot_state_publisher", executable="robot_state_publisher", output="screen",
             parameters=[{"robot_description": urdf}]),
    ])
