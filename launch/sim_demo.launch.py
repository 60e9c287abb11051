"""A policy checkpoint drives the simulated arm: lapa_sim_arm + lapa_policy_server + robot_state_publisher
(real ROS 2 installs).

    ros2 launch lapa_ros sim_demo.launch.py checkpoint:=/path/to/policy [task:=push seed:=3] \
        [image_topic:=... twist_topic:=... control_rate:=10.0]

Then send goals:
    ros2 action send_goal /lapa_policy_server/follow_instruction lapa_interfaces/action/FollowInstruction \
        "{instruction: 'go to the red block'}" --feedback

Arguments left out keep the values in config/sim_arm.yaml and config/policy_server.yaml. The node
graph (nodes, parameter files, argument -> parameter mapping, wiring) comes from
lapa_policy_node/graphs.py; `lapa run sim_demo --checkpoint ... [--instruction ...]` starts the same
graph from the same files where `launch` is not installed.
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from lapa_policy_node.graphs import PACKAGE, SIM_DEMO as GRAPH


def _nodes(context):
    share = Path(get_package_share_directory(PACKAGE))
    values = {arg.name: LaunchConfiguration(arg.name).perform(context) for arg in GRAPH.arguments}
    overrides = GRAPH.parameters(values)  # typed, and only the arguments that were given
    nodes = []
    for spec in GRAPH.nodes:
        parameters = [str(share / spec.params_file)] if spec.params_file else []
        given = dict(overrides[spec.key])
        given.update({param: (share / rel).read_text() for param, rel in spec.file_params.items()})
        if given:
            parameters.append(given)
        nodes.append(Node(package=spec.package, executable=spec.executable, name=spec.name, output="screen",
                          parameters=parameters))
    return nodes


def generate_launch_description():
    declared = []
    for arg in GRAPH.arguments:
        if arg.required:
            declared.append(DeclareLaunchArgument(arg.name, description=arg.help))
        else:  # "" = keep the parameter file's value
            declared.append(DeclareLaunchArgument(arg.name, default_value="",
                                                  description=f"{arg.help} (default: from config/*.yaml)"))
    return LaunchDescription([*declared, OpaqueFunction(function=_nodes)])
