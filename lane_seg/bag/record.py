"""
``lane-seg bag record``: record live topics into a rosbag2 bag (rclpy + rosbags' writer).

Subscriptions are generic: a topic's type comes from ``--types`` or from the graph
(``node.get_topic_names_and_types()``, polled until every requested topic is found), and the
subscription is *raw*: rclpy hands over the CDR bytes exactly as published, which go into the
bag unchanged, as ``ros2 bag record`` does (no deserialize / re-serialize round trip).  The bag
timestamp of each message is its receive time on the recorder node's clock (the ROS time under
``use_sim_time``), so ``bag eval`` can measure output latency as receive time minus header stamp.

The QoS of each subscription adapts to the publishers found (best effort if any publisher is,
transient-local if all are) and the publishers' profiles are stored as ``offered_qos_profiles``.
Message definitions come from the Kilted typestore; a type it lacks is described from its rclpy
class (:func:`msgdef_from_rclpy`, constants omitted), so any importable type can be recorded.
"""

import threading
import time

from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)

from .convert import MessageConverter, UnknownTypeError
from .io import BagError, BagWriter, register_msgdef, typestore

_IDL_TO_MSG = {'boolean': 'bool', 'octet': 'byte', 'float': 'float32', 'double': 'float64',
               'long double': 'float64'}


def _msg_field_type(idl):
    """Field type string from ``get_fields_and_field_types()`` in .msg syntax."""
    if idl.startswith('sequence<') and idl.endswith('>'):
        inner = idl[len('sequence<'):-1]
        if ',' in inner:
            elem, bound = (x.strip() for x in inner.rsplit(',', 1))
            return f'{_msg_field_type(elem)}[<={bound}]'
        return f'{_msg_field_type(inner)}[]'
    if idl.endswith(']') and '[' in idl:
        elem, size = idl[:-1].split('[', 1)
        return f'{_msg_field_type(elem)}[{size}]'
    return _IDL_TO_MSG.get(idl, idl)


def _nested_types(idl):
    base = _msg_field_type(idl).split('[', 1)[0]
    return [base] if '/' in base else []


def msgdef_from_rclpy(cls, msgtype):
    """
    Describe an rclpy class as a concatenated ros2msg definition (``MSG: pkg/Type`` parts).

    Fields, their types and array bounds only; constants and default values are omitted.
    """
    converter = MessageConverter()
    sections, seen, queue = [], set(), [(msgtype, cls)]
    while queue:
        name, klass = queue.pop(0)
        lines = []
        for field, idl in klass.get_fields_and_field_types().items():
            lines.append(f'{_msg_field_type(idl)} {field}')
            for nested in _nested_types(idl):
                full = nested if nested.count('/') == 2 else nested.replace('/', '/msg/')
                if full not in seen:
                    seen.add(full)
                    queue.append((full, converter.rclpy_class(full)))
        sections.append((name, '\n'.join(lines)))
    text = sections[0][1] + '\n'
    for name, body in sections[1:]:
        short = name.replace('/msg/', '/')
        text += '=' * 80 + f'\nMSG: {short}\n{body}\n'
    return text


def rosbags_qos(profile):
    """Convert an rclpy QoSProfile to rosbags' Qos (durations left at their defaults)."""
    zero = QosTime(0, 0)

    def enum(cls, value):
        try:
            return cls(int(value))
        except ValueError:
            return cls.UNKNOWN

    return Qos(enum(QosHistory, profile.history), int(profile.depth),
               enum(QosReliability, profile.reliability),
               enum(QosDurability, profile.durability), zero, zero,
               enum(QosLiveliness, profile.liveliness), zero,
               bool(profile.avoid_ros_namespace_conventions))


def subscription_qos(profiles):
    """Make a recorder QoS that matches every publisher offering ``profiles``."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    profiles = list(profiles)
    best_effort = any(p.reliability == ReliabilityPolicy.BEST_EFFORT for p in profiles)
    latched = bool(profiles) and all(
        p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in profiles)
    return QoSProfile(
        depth=100,
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def _hash_text(type_hash):
    value = getattr(type_hash, 'value', None)
    if getattr(type_hash, 'version', 0) == 1 and value:
        return 'RIHS01_' + bytes(value).hex()
    return None


class BagRecorder:
    """
    Record ``topics`` on ``node`` into a new bag at ``out``; spin the node to record.

    >>> rec = BagRecorder(node, 'out_bag', ['/image'])
    >>> rec.start()          # opens the bag, subscribes to what the graph shows
    >>> ...spin node...      # discovery is retried every 0.2 s until all topics are found
    >>> stats = rec.stop()   # closes the bag (metadata.yaml written)
    """

    def __init__(self, node, out, topics, types=None, storage='mcap', discovery_period=0.2):
        if not topics:
            raise BagError('no topics to record')
        if types is not None and len(types) != len(topics):
            raise BagError(f'{len(types)} types for {len(topics)} topics')
        self.node = node
        self.out = out
        self.topics = [self._resolve(t) for t in topics]
        self.types = dict(zip(self.topics, types)) if types else {}
        self.storage = storage
        self.discovery_period = discovery_period
        self.converter = MessageConverter()
        self.store = typestore()
        self.bag = None
        self.stats = {'bag': str(out), 'storage': storage, 'recorded': {}, 'waiting_for': [],
                      'skipped_unknown_type': {}, 'warnings': []}
        self._subs = {}
        self._lock = threading.Lock()
        self._timer = None

    def _resolve(self, topic):
        return topic if topic.startswith('/') else '/' + topic

    def start(self):
        self.bag = BagWriter(self.out, storage=self.storage, store=self.store,
                             custom_data={'lane_seg.generator': 'lane-seg bag record'})
        self.bag.start()
        self.discover()
        # a steady clock: under use_sim_time a ROS-time timer would wait for /clock
        from rclpy.clock import Clock, ClockType
        self._timer = self.node.create_timer(self.discovery_period, self.discover,
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        return self

    def discover(self):
        """Subscribe to requested topics that have appeared (or have an explicit type)."""
        pending = [t for t in self.topics if t not in self._subs]
        if not pending or self.bag is None:
            return
        graph = dict(self.node.get_topic_names_and_types())
        for topic in pending:
            msgtype = self.types.get(topic) or (graph.get(topic) or [None])[0]
            if msgtype is None:
                continue
            if len(graph.get(topic, [])) > 1:
                self._warn(f'{topic} has several types {graph[topic]}; recording {msgtype}')
            self._subscribe(topic, msgtype)

    def _warn(self, text):
        self.stats['warnings'].append(text)
        self.node.get_logger().warning(text)

    def _subscribe(self, topic, msgtype):
        try:
            cls = self.converter.rclpy_class(msgtype)
        except UnknownTypeError as exc:
            self._subs[topic] = None
            self.stats['skipped_unknown_type'][msgtype] = topic
            self._warn(f'{topic}: {exc}; not recorded')
            return
        infos = self.node.get_publishers_info_by_topic(topic)
        offered = [i.qos_profile for i in infos]
        announced = {_hash_text(i.topic_type_hash) for i in infos} - {None}
        msgdef = rihs01 = None
        if msgtype not in self.store.fielddefs:
            register_msgdef(self.store, msgtype, msgdef_from_rclpy(cls, msgtype))
        if announced and self.store.hash_rihs01(msgtype) not in announced:
            self._warn(f'{topic}: publishers announce {sorted(announced)}, but the '
                       f'typestore hashes {msgtype} differently; storing the announced hash')
            msgdef = self.store.generate_msgdef(msgtype, ros_version=2)[0]
            rihs01 = sorted(announced)[0]
        self.bag.add_topic(topic, msgtype, [rosbags_qos(p) for p in offered] or None,
                           msgdef=msgdef, rihs01=rihs01)
        self.stats['recorded'][topic] = 0

        def callback(data, topic=topic):
            self._write(topic, data)

        self._subs[topic] = self.node.create_subscription(
            cls, topic, callback, subscription_qos(offered), raw=True)
        self.node.get_logger().info(f'recording {topic} ({msgtype})')

    def _write(self, topic, data):
        stamp = self.node.get_clock().now().nanoseconds
        with self._lock:
            if self.bag is None:
                return
            self.bag.write_raw(topic, data, stamp)
            self.stats['recorded'][topic] += 1

    def stop(self):
        """Stop subscribing, close the bag and return the stats."""
        if self._timer is not None:
            self.node.destroy_timer(self._timer)
            self._timer = None
        for sub in self._subs.values():
            if sub is not None:
                self.node.destroy_subscription(sub)
        self._subs = dict.fromkeys(self._subs)
        with self._lock:
            if self.bag is not None:
                self.bag.close()
                self.bag = None
        self.stats['waiting_for'] = [t for t in self.topics if t not in self.stats['recorded']]
        return self.stats


def record(out, topics, duration=None, types=None, storage='mcap', stop=None,
           use_sim_time=False, node_name='lane_seg_bag_recorder', context=None,
           max_messages=None):
    """
    Record until ``duration`` s pass, ``max_messages`` are written, ``stop``, Ctrl-C or shutdown.

    rclpy must be initialized.  Returns the recorder's stats; the bag is always closed.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.parameter import Parameter
    overrides = [Parameter('use_sim_time', Parameter.Type.BOOL, True)] if use_sim_time else []
    node = rclpy.create_node(node_name, parameter_overrides=overrides, context=context)
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    recorder = BagRecorder(node, out, topics, types, storage)
    stop = stop if stop is not None else threading.Event()
    end = None if duration is None else time.monotonic() + duration
    try:
        recorder.start()
        while not stop.is_set() and (end is None or time.monotonic() < end):
            executor.spin_once(timeout_sec=0.05)
            if max_messages is not None and \
                    sum(recorder.stats['recorded'].values()) >= max_messages:
                break
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stats = recorder.stop()
        executor.remove_node(node)
        executor.shutdown()
        node.destroy_node()
    return stats
