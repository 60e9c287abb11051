"""The episode recorder (real ROS 2 installs): one rosbag2 bag per demonstration.

    ros2 launch lapa_ros record.launch.py output_dir:=~/demos image_topic:=/wrist_camera/image_raw

Start and stop episodes with its services (or `lapa record` here, which runs the same node with the
same config/recorder.yaml):
    ros2 service call /lapa_recorder/start lapa_interfaces/srv/StartEpisode "{instruction: 'pick up the red block'}"
    ros2 service call /lapa_recorder/stop lapa_interfaces/srv/StopEpisode "{task_success: true}"
    ros2 service call /lapa_recorder/discard std_srvs/srv/Trigger
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    params = str(Path(get_package_share_directory("lapa_ros")) / "config" / "recorder.yaml")
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument("output_dir", default_value="data/bags", description="one bag per episode goes here"),
        DeclareLaunchArgument("storage", default_value="mcap", description="mcap or sqlite3"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="camera to record"),
        DeclareLaunchArgument("twist_topic", default_value="/servo_node/delta_twist_cmds",
                              description="commanded end-effector twist (MoveIt Servo input)"),
        Node(package="lapa_ros", executable="lapa_recorder", name="lapa_recorder", output="screen",
             parameters=[params, {"output_dir": arg("output_dir"), "storage": arg("storage"),
                                  "image_topics": [arg("image_topic")], "twist_topic": arg("twist_topic")}]),
    ])
