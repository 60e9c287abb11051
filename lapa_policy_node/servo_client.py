"""Put MoveIt Servo into twist mode and unpause it, where MoveIt is installed.

Servo (Jazzy and newer) takes twists only in TWIST command mode and may start paused:
``<servo>/switch_command_type`` (moveit_msgs/srv/ServoCommandType, TWIST = 1) and
``<servo>/pause_servo`` (std_srvs/srv/SetBool, false = run). moveit_msgs is not available as a
PyPI wheel, so on a venv install this says once, clearly, that it cannot switch, and carries on: the
arm then moves only if Servo already accepts twists (or, as with lapa_sim_arm, needs no switching).
"""

from __future__ import annotations

from std_srvs.srv import SetBool


class ServoModeSwitcher:
    def __init__(self, node, servo_node: str):
        self.node, self.servo_node = node, servo_node.rstrip("/")
        self.log = node.get_logger()
        try:
            from moveit_msgs.srv import ServoCommandType
        except ImportError:
            self.ServoCommandType = None
            self.log.warn(f"moveit_msgs is not importable: cannot switch {self.servo_node} to twist mode or "
                          "unpause it; make sure Servo accepts TwistStamped commands (command type TWIST)")
            return
        self.ServoCommandType = ServoCommandType
        self.switch = node.create_client(ServoCommandType, f"{self.servo_node}/switch_command_type")
        self.pause = node.create_client(SetBool, f"{self.servo_node}/pause_servo")

    def ensure_twist_mode(self, timeout: float = 2.0) -> bool:
        """Switch to TWIST and unpause; True when Servo confirmed both."""
        if self.ServoCommandType is None:
            return False
        ok = True
        for client, request, what in (
                (self.switch, self.ServoCommandType.Request(command_type=self.ServoCommandType.Request.TWIST),
                 "switch to twist commands"),
                (self.pause, SetBool.Request(data=False), "unpause")):
            if not client.wait_for_service(timeout_sec=timeout):
                self.log.warn(f"{client.srv_name} not available: could not {what}")
                ok = False
                continue
            response = client.call(request, timeout_sec=timeout)
            if response is None or not response.success:
                self.log.warn(f"MoveIt Servo refused to {what}: {getattr(response, 'message', 'no answer')}")
                ok = False
        if ok:
            self.log.info(f"{self.servo_node}: twist command mode, running")
        return ok
