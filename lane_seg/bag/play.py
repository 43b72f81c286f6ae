"""
``lane-seg bag play``: publish a bag through rclpy with the original timing (and ``/clock``).

For machines without the ``ros2`` CLI; on a full ROS install ``ros2 bag play`` does the same.
Each message is deserialized with rosbags (so a corrupted one is caught and skipped instead of
being forwarded) and converted to its rclpy class (:mod:`lane_seg.bag.convert`).  Messages keep
their header stamps; they are sent at ``(t - t0) / rate`` after the start of each pass, where
``t`` is the bag timestamp.  With ``loop`` the bag restarts right after its last message (stamps
and ``/clock`` jump back, as with ``ros2 bag play --loop``).  With ``clock`` the player publishes
``rosgraph_msgs/Clock`` on ``/clock``: the bag time of every message just before it, and the
interpolated bag time at ``clock_hz`` while waiting, so nodes with ``use_sim_time`` follow.

Start-up and shut-down, as with ``ros2 bag play``: ``wait_for_subscribers`` seconds for
subscribers to match (on ``wait_topics``, or on any topic), ``delay`` more seconds, and at the
end ``wait_for_acks`` seconds for reliable subscribers to acknowledge the last messages (so a
short bag is not lost when the process exits right after publishing it).

Never crashes on a bad bag: topics whose type has no rclpy class, undecodable messages and
messages that do not convert are skipped, logged (throttled) and counted in the returned stats;
a damaged file plays what can be salvaged (see :class:`lane_seg.bag.io.BagReader`).
"""

from dataclasses import dataclass
import threading
import time

from .convert import ConversionError, MessageConverter, UnknownTypeError
from .io import BagReader, CLOCK_TYPE, DecodeError
from .io import qos as default_qos

_LOG_FIRST = 5


@dataclass(frozen=True)
class PlayOptions:
    """How to play: ``loops`` passes (None: forever, with ``loop``), at ``rate`` x speed."""

    rate: float = 1.0
    loop: bool = False
    loops: int | None = None
    topics: tuple | None = None
    clock: bool = False
    clock_hz: float = 40.0
    delay: float = 0.0
    wait_for_subscribers: float = 0.0
    wait_topics: tuple = ()
    wait_for_acks: float = 0.0
    remap: tuple = ()

    def __post_init__(self):
        if not self.rate > 0.0:
            raise ValueError(f'rate={self.rate} must be > 0')
        if not self.clock_hz > 0.0:
            raise ValueError(f'clock_hz={self.clock_hz} must be > 0')
        if self.loops is not None and self.loops < 1:
            raise ValueError(f'loops={self.loops} must be >= 1')
        if min(self.delay, self.wait_for_subscribers, self.wait_for_acks) < 0.0:
            raise ValueError('delay, wait_for_subscribers and wait_for_acks must be >= 0')

    @property
    def passes(self):
        if self.loops is not None:
            return self.loops
        return None if self.loop else 1


def rclpy_qos(profiles):
    """Make an rclpy QoS profile for a publisher re-offering what the bag recorded."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.interfaces import QosDurability, QosReliability
    profiles = list(profiles) or [default_qos()]
    best_effort = any(p.reliability == QosReliability.BEST_EFFORT for p in profiles)
    latched = all(p.durability == QosDurability.TRANSIENT_LOCAL for p in profiles)
    depth = max([10] + [int(p.depth) for p in profiles])
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class _Throttle:
    """Log the first few problems of each kind, then every 100th."""

    def __init__(self, logger):
        self.logger = logger
        self.seen = {}

    def warn(self, kind, text):
        n = self.seen[kind] = self.seen.get(kind, 0) + 1
        if n <= _LOG_FIRST or n % 100 == 0:
            suffix = f' ({n} so far)' if n > _LOG_FIRST else ''
            self.logger.warning(text + suffix)


class _Shutdown(Exception):
    """The rclpy context was shut down (Ctrl-C, SIGTERM): stop playing."""


class BagPlayer:
    """
    Publish a bag on ``node`` (an rclpy Node the caller owns and spins, or does not spin).

    :meth:`run` blocks until the bag is played (or ``stop`` is set) and returns the stats.
    """

    def __init__(self, node, path, options=PlayOptions()):
        self.node = node
        self.path = path
        self.options = options
        self.converter = MessageConverter()
        self.log = _Throttle(node.get_logger())
        self.stats = {
            'bag': str(path), 'published': {}, 'skipped_unknown_type': {},
            'decode_errors': 0, 'conversion_errors': 0, 'publish_errors': 0,
            'storage_errors': 0,
            'clock_messages': 0, 'passes': 0, 'stamp_jumps_back': 0, 'warnings': [],
            'missing_in_storage': {}, 'interrupted': False,
        }
        self._publishers = {}
        self._clock_pub = None
        self._clock_msg = None
        self._last_stamp = {}

    # -- set-up

    def _setup(self, bag):
        wanted = None if self.options.topics is None else set(self.options.topics)
        remap = dict(self.options.remap)
        for topic, info in sorted(bag.topics.items()):
            if wanted is not None and topic not in wanted:
                continue
            try:
                cls = self.converter.rclpy_class(info.msgtype)
            except UnknownTypeError as exc:
                self.stats['skipped_unknown_type'].setdefault(info.msgtype, 0)
                self.node.get_logger().warning(f'{topic}: {exc}; its messages are skipped')
                continue
            self._publishers[topic] = self.node.create_publisher(
                cls, remap.get(topic, topic), rclpy_qos(info.offered_qos))
            self.stats['published'][topic] = 0
        if wanted:
            for topic in sorted(wanted - set(bag.topics)):
                self.node.get_logger().warning(f'{topic} is not in the bag')
        if self.options.clock:
            from rclpy.qos import QoSProfile
            clock_cls = self.converter.rclpy_class(CLOCK_TYPE)
            self._clock_pub = self.node.create_publisher(clock_cls, '/clock',
                                                         QoSProfile(depth=10))
            self._clock_msg = clock_cls()

    def _wait_for_subscribers(self, stop):
        """
        Wait until each ``wait_topics`` publisher has a subscriber (up to the timeout).

        Without ``wait_topics``: until any publisher has one.  Then 0.2 s more, so that
        subscribers starting together (the nodes of a launch) are all matched both ways.
        """
        deadline = time.monotonic() + self.options.wait_for_subscribers
        remap = dict(self.options.remap)
        if self.options.wait_topics:
            pubs = [p for t, p in self._publishers.items()
                    if t in self.options.wait_topics or remap.get(t) in self.options.wait_topics]
            ready = all
        else:
            pubs = list(self._publishers.values())
            ready = any
        while pubs and time.monotonic() < deadline and not stop.is_set():
            if not self.node.context.ok():
                raise _Shutdown()
            if ready(p.get_subscription_count() > 0 for p in pubs):
                # discovery is not symmetric: let the subscribers match us too, and (without
                # wait_topics) let subscribers that started together all be matched
                stop.wait(0.2)
                return
            stop.wait(0.01)

    # -- playing

    def _wait_for_acks(self, timeout_s):
        """
        Let reliable subscribers acknowledge everything before the node goes (up to a timeout).

        Across processes Fast DDS acknowledges on its heartbeat period, so this can take
        seconds even when everything has arrived.
        """
        from rclpy.duration import Duration
        end = time.monotonic() + timeout_s
        for pub in list(self._publishers.values()) + [self._clock_pub]:
            if pub is not None and pub.get_subscription_count() and self.node.context.ok():
                left = max(0.0, end - time.monotonic())
                pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9)))

    def _publish_clock(self, stamp):
        if self._clock_pub is None:
            return
        self._clock_msg.clock.sec, self._clock_msg.clock.nanosec = divmod(int(stamp),
                                                                          1_000_000_000)
        self._publish(self._clock_pub, self._clock_msg)
        self.stats['clock_messages'] += 1

    def _publish(self, pub, msg):
        """Publish; False (counted, logged) if rclpy refuses the message."""
        try:
            pub.publish(msg)
        except Exception as exc:   # RCLError once the context is shut down, or a bad message
            if not self.node.context.ok():
                raise _Shutdown() from None
            self.stats['publish_errors'] += 1
            self.log.warn('publish', f'{pub.topic_name}: not published: {exc}')
            return False
        return True

    def _sleep_until(self, target, bag_time_at, stop):
        """Wait for wall time ``target``, publishing ``/clock`` at ``clock_hz`` meanwhile."""
        period = 1.0 / self.options.clock_hz
        while not stop.is_set():
            if not self.node.context.ok():
                raise _Shutdown()
            now = time.monotonic()
            remaining = target - now
            if remaining <= 0.0:
                return True
            if self._clock_pub is not None:
                stop.wait(min(remaining, period))
                if time.monotonic() < target:
                    self._publish_clock(bag_time_at(time.monotonic()))
            else:
                stop.wait(remaining)
        return False

    def _one_pass(self, bag, stop):
        topics = list(self._publishers) + [t for t, i in bag.topics.items()
                                           if i.msgtype in self.stats['skipped_unknown_type']]
        if self.options.topics is not None:
            topics = [t for t in topics if t in self.options.topics]
        rate = self.options.rate
        t0 = start = None
        bag.reset_counts()
        for item in bag.messages(topics):
            if t0 is None:
                t0, start = item.timestamp, time.monotonic()
            target = start + max(0, item.timestamp - t0) / 1e9 / rate

            def bag_time_at(wall, t0=t0, start=start):
                return t0 + int((wall - start) * rate * 1e9)

            if not self._sleep_until(target, bag_time_at, stop):
                return False
            pub = self._publishers.get(item.topic)
            if pub is None:
                self.stats['skipped_unknown_type'][item.msgtype] = \
                    self.stats['skipped_unknown_type'].get(item.msgtype, 0) + 1
                continue
            try:
                msg = self.converter.convert(bag.decode(item), item.msgtype)
            except DecodeError as exc:
                self.stats['decode_errors'] += 1
                self.log.warn('decode', f'skipped: {exc}')
                continue
            except ConversionError as exc:
                self.stats['conversion_errors'] += 1
                self.log.warn('convert', f'{item.topic}: skipped: {exc}')
                continue
            stamp = getattr(getattr(msg, 'header', None), 'stamp', None)
            if stamp is not None:
                ns = stamp.sec * 1_000_000_000 + stamp.nanosec
                if ns < self._last_stamp.get(item.topic, ns):
                    self.stats['stamp_jumps_back'] += 1
                self._last_stamp[item.topic] = ns
            self._publish_clock(item.timestamp)
            if self._publish(pub, msg):
                self.stats['published'][item.topic] += 1
        return True

    def run(self, stop=None):
        """Play the bag; returns the stats dict (also on ``stop`` or KeyboardInterrupt)."""
        stop = stop if stop is not None else threading.Event()
        begin = time.monotonic()
        with BagReader(self.path) as bag:
            self._setup(bag)
            try:
                self._wait_for_subscribers(stop)
                if self.options.delay:
                    stop.wait(self.options.delay)
                passes = self.options.passes
                while not stop.is_set() and (passes is None or self.stats['passes'] < passes):
                    if not self._one_pass(bag, stop):
                        break
                    self.stats['passes'] += 1
                    if passes is None and not any(self.stats['published'].values()):
                        break   # looping forever over nothing playable
                if self.options.wait_for_acks:
                    self._wait_for_acks(self.options.wait_for_acks)
            except (KeyboardInterrupt, _Shutdown):
                self.stats['interrupted'] = True
            finally:
                self.stats['storage_errors'] = bag.storage_errors
                self.stats['warnings'] = list(bag.warnings)
                if self.stats['passes']:
                    self.stats['missing_in_storage'] = bag.integrity()
                self.stats['wall_s'] = round(time.monotonic() - begin, 3)
                if self.node.context.ok():
                    for pub in self._publishers.values():
                        self.node.destroy_publisher(pub)
                    if self._clock_pub is not None:
                        self.node.destroy_publisher(self._clock_pub)
        return self.stats


def play(path, options=PlayOptions(), stop=None, node_name='lane_seg_bag_player',
         context=None):
    """Create a node (rclpy must be initialized), play the bag, destroy the node."""
    import rclpy
    node = rclpy.create_node(node_name, context=context)
    try:
        return BagPlayer(node, path, options).run(stop)
    finally:
        node.destroy_node()
