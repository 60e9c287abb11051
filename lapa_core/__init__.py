"""The ROS-free core every other package builds on: the policy interface and its registry
(``policy``), the motion limits (``safety``), the controller step that turns a camera image into a
limited twist (``controller``) and the node parameter spec (``node_params``).

Nothing here imports ROS, torch or another lapa package; a test enforces the layer order
lapa_core < lapa_sim < lapa_training < lapa_policy_node < lapa_cli.
"""
