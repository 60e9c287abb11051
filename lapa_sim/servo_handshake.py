"""MoveIt Servo's command handshake, as the simulated arm emulates it (no ROS here; the node wires it).

A real Servo (Jazzy, Kilted) drops every twist until a client switches it to TWIST commands
(``<servo>/switch_command_type``) and unpauses it (``<servo>/pause_servo``), and drops twists whose
header stamp is older than its ``incoming_command_timeout``. With ``required`` off, the simulated
arm starts switched and running and checks no stamps, as it always did for clients that know
nothing of Servo (the scripted teleop, users' own scripts).

    gate = ServoHandshake(required=True, incoming_command_timeout=0.1)
    gate.switch(TWIST); gate.pause(False)
    gate.refusal(stamp_age_s=0.02)  # "" : the twist is applied
"""

from __future__ import annotations

JOINT_JOG, TWIST, POSE = 0, 1, 2  # moveit_msgs/srv/ServoCommandType
COMMAND_TYPES = {JOINT_JOG: "JOINT_JOG", TWIST: "TWIST", POSE: "POSE"}
# moveit_msgs/msg/ServoStatus codes
NO_WARNING, HALT_FOR_SINGULARITY, HALT_FOR_COLLISION, JOINT_BOUND = 0, 2, 5, 6
HALT_CODES = (HALT_FOR_SINGULARITY, HALT_FOR_COLLISION, JOINT_BOUND)


class ServoHandshake:
    def __init__(self, required: bool, incoming_command_timeout: float = 0.1):
        self.required = required
        self.incoming_command_timeout = incoming_command_timeout
        self.command_type = JOINT_JOG if required else TWIST
        self.paused = required

    def switch(self, command_type: int) -> bool:
        if command_type not in COMMAND_TYPES:
            return False
        self.command_type = command_type
        return True

    def pause(self, paused: bool) -> None:
        self.paused = bool(paused)

    def refusal(self, stamp_age_s: float) -> str:
        """Why a twist stamped stamp_age_s ago is dropped, or "" when it is applied."""
        if self.paused:
            return "servo is paused (call pause_servo with false)"
        if self.command_type != TWIST:
            return f"command type is {COMMAND_TYPES[self.command_type]}, not TWIST (call switch_command_type)"
        if self.required and stamp_age_s > self.incoming_command_timeout:
            return (f"command stamped {stamp_age_s:.3f} s ago, older than incoming_command_timeout "
                    f"{self.incoming_command_timeout:g} s")
        return ""


def status_of(halted_reason: str) -> tuple[int, str]:
    """The ServoStatus (code, message) for the simulated servo's halted reason."""
    if halted_reason.startswith("joint limit"):
        return JOINT_BOUND, f"halted: {halted_reason}"
    return NO_WARNING, halted_reason or "moving"
