"""/diagnostics for a node: lapa_core.health statuses as diagnostic_msgs/DiagnosticArray, once a second."""

from __future__ import annotations

from typing import Callable

from lapa_core.health import Status


class DiagnosticsPublisher:
    def __init__(self, node, statuses: Callable[[], list[Status]], period_s: float = 1.0):
        from diagnostic_msgs.msg import DiagnosticArray

        self.node, self.statuses = node, statuses
        self.pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.hardware_id = node.get_fully_qualified_name()
        node.create_timer(period_s, self.publish)

    def publish(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        msg = DiagnosticArray()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.status = [DiagnosticStatus(level=bytes([s.level]), name=s.name, message=s.message,
                                       hardware_id=self.hardware_id,
                                       values=[KeyValue(key=k, value=v) for k, v in s.values.items()])
                      for s in self.statuses()]
        self.pub.publish(msg)
