"""ament_python package lapa_ros: nodes, simulator, training code and the `lapa` CLI.

Works both ways: `colcon build` in ros2_ws/ on a real ROS 2 install, and `pip install -e .` in the
venv that ./setup.sh makes. Third-party versions are pinned in requirements.txt, not here.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "lapa_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["lapa_core", "lapa_core.*", "lapa_sim", "lapa_sim.*", "lapa_policy_node", "lapa_policy_node.*",
                                    "lapa_training", "lapa_training.*", "lapa_cli", "lapa_cli.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
        (f"share/{PACKAGE}/config/train/presets", glob("config/train/presets/*.yaml")),
        (f"share/{PACKAGE}/urdf", glob("urdf/*.urdf")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    python_requires=">=3.10",
    description="Latent Action Pretraining (LAPA) for ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "lapa = lapa_cli.main:main",
            "lapa_sim_arm = lapa_policy_node.sim_arm_node:main",
            "lapa_recorder = lapa_policy_node.recorder_node:main",
            "lapa_policy_server = lapa_policy_node.policy_server_node:main",
        ],
        # policy types lapa_core.policy.load_policy can load, without the core importing them
        "lapa_ros.policy_types": [
            "lapa_vla = lapa_training.vla.policy:load_vla_policy",
        ],
    },
)
