"""
Quality-of-service profiles of the lane_seg nodes.

Camera input: sensor-data style, depth 1, so the newest frame always wins and a slow node
never works through a backlog; best effort by default, which matches both best-effort and
reliable publishers (the CARLA bridge publishes reliable, depth 10). Outputs: reliable, depth
5, which RViz, ``ros2 bag record`` and ``ros2 topic echo`` all match. The reliability of
either can be overridden from the parameter file (``qos_reliability``).
"""

from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)

RELIABILITY = {
    'best_effort': ReliabilityPolicy.BEST_EFFORT,
    'reliable': ReliabilityPolicy.RELIABLE,
    'system_default': ReliabilityPolicy.SYSTEM_DEFAULT,
}
INPUT_DEPTH = 1
OUTPUT_DEPTH = 5


def _reliability(name: str) -> ReliabilityPolicy:
    try:
        return RELIABILITY[name]
    except KeyError:
        raise ValueError(f'qos reliability {name!r} not one of {sorted(RELIABILITY)}') from None


def input_qos(reliability: str = 'best_effort', depth: int = INPUT_DEPTH) -> QoSProfile:
    """Return the camera input profile: keep last ``depth`` (1), volatile, best effort."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=_reliability(reliability),
                      durability=DurabilityPolicy.VOLATILE)


def output_qos(reliability: str = 'reliable', depth: int = OUTPUT_DEPTH) -> QoSProfile:
    """Return the output profile: keep last ``depth`` (5), volatile, reliable by default."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=_reliability(reliability),
                      durability=DurabilityPolicy.VOLATILE)
