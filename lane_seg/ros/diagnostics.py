"""
``/diagnostics`` for a node from its :class:`lane_seg.latency.LatencyStats`.

Like ``diagnostic_updater``: one ``diagnostic_msgs/DiagnosticStatus`` per node (name
``<node name>: <task>``, ``hardware_id`` = the node's name, level, message and key/values
from ``LatencyStats.status()``) in a ``DiagnosticArray`` published at 1 Hz. The timer runs on
the steady clock, so diagnostics keep coming (and turn ERROR) when ``use_sim_time`` is on and
the ``/clock`` stops.
"""

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

TOPIC = '/diagnostics'
QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                 reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def status_message(node_name: str, task: str, status) -> DiagnosticStatus:
    """Build a ``DiagnosticStatus`` from a ``lane_seg.latency.Status``."""
    msg = DiagnosticStatus()
    msg.level = bytes([int(status.level)])
    msg.name = f'{node_name}: {task}'
    msg.message = status.message
    msg.hardware_id = node_name
    msg.values = [KeyValue(key=str(k), value=str(v)) for k, v in status.values]
    return msg


class DiagnosticsPublisher:
    """
    Publish ``status_fn()`` (a ``lane_seg.latency.Status``) on ``/diagnostics`` every period.

    ``status_fn`` is called from the timer callback; it must be thread safe with respect to
    the node's worker (the nodes take their stats lock inside it).
    """

    def __init__(self, node, status_fn, task: str = 'latency', period_s: float = 1.0):
        self.node = node
        self.status_fn = status_fn
        self.task = task
        self.publisher = node.create_publisher(DiagnosticArray, TOPIC, QOS)
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.timer = node.create_timer(period_s, self.publish, clock=self._steady)

    def make_array(self) -> DiagnosticArray:
        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        name = self.node.get_fully_qualified_name().lstrip('/')
        array.status = [status_message(name, self.task, self.status_fn())]
        return array

    def publish(self):
        try:
            array = self.make_array()
        except Exception as exc:  # never let a diagnostics bug kill the node's executor
            self.node.get_logger().error(f'diagnostics failed: {exc!r}',
                                         throttle_duration_sec=10.0)
            return
        self.publisher.publish(array)
