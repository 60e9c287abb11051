"""The MoveIt Servo handshake: TWIST mode and unpaused before the first twist, and halts reported back.

Servo (Jazzy and newer) takes twists only in TWIST command mode and may start paused:
``<servo>/switch_command_type`` (moveit_msgs/srv/ServoCommandType, TWIST = 1) and
``<servo>/pause_servo`` (std_srvs/srv/SetBool, false = run). It reports why it halted on
``<servo>/status`` (moveit_msgs/msg/ServoStatus: singularity, collision, joint bound).

The calls are made from the goal's own thread (never the executor's), with a timeout. A Servo that
offers no such services (before Jazzy, or another twist consumer) gets a warning and the goal goes
on; a Servo that answers and refuses ends the goal. Without moveit_msgs (a venv that did not run
./setup.sh) this says so once and goes on.
"""

from __future__ import annotations

from typing import Callable

from std_srvs.srv import SetBool

HALT_CODES = {2: "halted for singularity", 5: "halted for collision", 6: "halted at a joint bound"}  # ServoStatus


class ServoModeSwitcher:
    def __init__(self, node, servo_node: str, on_halt: Callable[[str], None] | None = None):
        self.node, self.servo_node = node, servo_node.rstrip("/")
        self.log = node.get_logger()
        self.on_halt = on_halt
        self.last_status: tuple[int, str] | None = None  # (ServoStatus code, message), for /diagnostics
        try:
            from moveit_msgs.msg import ServoStatus
            from moveit_msgs.srv import ServoCommandType
        except ImportError:
            self.ServoCommandType = None
            self.log.warn(f"moveit_msgs is not importable: cannot switch {self.servo_node} to twist mode or "
                          "unpause it; make sure Servo accepts TwistStamped commands (command type TWIST)")
            return
        self.ServoCommandType = ServoCommandType
        self.switch = node.create_client(ServoCommandType, f"{self.servo_node}/switch_command_type")
        self.pause = node.create_client(SetBool, f"{self.servo_node}/pause_servo")
        self.status = node.create_subscription(ServoStatus, f"{self.servo_node}/status", self._on_status, 10)

    def destroy(self) -> None:
        if self.ServoCommandType is not None:
            self.node.destroy_client(self.switch)
            self.node.destroy_client(self.pause)
            self.node.destroy_subscription(self.status)

    def _on_status(self, msg) -> None:
        self.last_status = (int(msg.code), msg.message)
        what = HALT_CODES.get(int(msg.code))
        if what is not None and self.on_halt is not None:
            self.on_halt(f"MoveIt Servo {what}" + (f": {msg.message}" if msg.message else ""))

    def ensure_twist_mode(self, timeout: float = 2.0) -> tuple[bool, str]:
        """Switch to TWIST and unpause. (False, why) only when Servo answered and refused; call it off the
        executor's threads (it waits for the answers)."""
        if self.ServoCommandType is None:
            return True, "moveit_msgs missing: no handshake"
        for client, request, what in (
                (self.switch, self.ServoCommandType.Request(command_type=self.ServoCommandType.Request.TWIST),
                 "switch to twist commands"),
                (self.pause, SetBool.Request(data=False), "unpause")):
            if not client.wait_for_service(timeout_sec=timeout):
                self.log.warn(f"{client.srv_name} not available: could not {what} (a Servo before Jazzy, or "
                              "no Servo: twists go out anyway)", throttle_duration_sec=30.0)
                continue
            response = client.call(request, timeout_sec=timeout)
            if response is None:
                return False, f"MoveIt Servo did not answer the request to {what} within {timeout:g} s"
            if not response.success:
                return False, f"MoveIt Servo refused to {what}" + (
                    f": {response.message}" if getattr(response, "message", "") else "")
        return True, f"{self.servo_node}: twist command mode, running"
