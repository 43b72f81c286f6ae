"""
What both perception nodes share (``PerceptionNode``), and their portable ``main()``.

Newest-frame slot, worker thread, rejection of bad frames, throttled logs, ground-truth
matching, diagnostics and portable start-up/shutdown.

The subscription callback does almost nothing: it stores the newest message in a one-slot
mailbox (an unprocessed message it replaces is counted as dropped) and wakes the worker
thread, which converts, runs the pure pipeline and publishes. So the executor is never
blocked by inference, and a slow node always works on the newest frame with a bounded
latency, whatever executor runs it. The pipeline is loaded by the worker too: topics and
``/diagnostics`` appear at once, and a load failure becomes an ERROR there (and a log line)
instead of a crash or a silent node.

The camera subscription is raw: the callback keeps the serialized bytes (one copy) and the
worker deserializes them (``lane_seg.image_cdr``, counted as conversion), so the executor
thread holds the GIL for a fraction of a millisecond per frame instead of the 0.9 ms rclpy
takes to build a Python message from an 800x600 ``bgra8`` frame. Output images go out as
serialized bytes too (one copy of the pixels instead of three).
"""

from collections import OrderedDict
import re
import threading
import time

from builtin_interfaces.msg import Time
from lane_seg.image_cdr import decode_image, encode_like
from lane_seg.image_conversion import (image_to_numpy, ImageConversionError,
                                       SUPPORTED_ENCODINGS)
from lane_seg.latency import LatencyStats, Level, SequenceGaps, Status
from lane_seg.process_tuning import (lower_thread_priority, parse_cpu_list, pin_process,
                                     pin_thread, tune_process)
import numpy as np
import rclpy
from rclpy.callback_groups import CallbackGroup
from rclpy.exceptions import InvalidHandle
from rclpy.executors import ExternalShutdownException
from rclpy.guard_condition import GuardCondition
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.subscription import Subscription
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from .diagnostics import DiagnosticsPublisher
from .params import NodeParameters
from .qos import input_qos, output_qos

ACCEPTED_ENCODINGS = ('bgr8', 'rgb8', 'bgra8', 'rgba8', 'mono8')

# rclpy passes a message info (the middleware's source and reception timestamps, the
# publisher's sequence number) to a callback of two arguments since Iron; Humble's calls every
# callback with the message alone. The publisher's id, without which sequence numbers of
# several publishers cannot be told apart, is in it since Kilted (rclpy 9.1.1): only then are
# lost frames counted.
CALLBACK_WITH_INFO = hasattr(Subscription, 'CallbackType')
LOST_FRAMES_COUNTED = CALLBACK_WITH_INFO and 'publisher_gid' in getattr(
    getattr(rclpy.subscription, 'MessageInfo', None), '__annotations__', {})


def receive_mode(choice: str) -> str:
    """Resolve the ``receive`` parameter: 'auto' is 'worker' where lost frames are counted."""
    if choice == 'auto':
        return 'worker' if LOST_FRAMES_COUNTED else 'executor'
    return choice


def message_info_parts(info, wall_ns: int, sim_time: bool = False):
    """
    Read rclpy's message info: ``(transport parts, publisher key, sequence number)``.

    The parts are ``middleware`` (the publisher's write to reception, ms) and ``executor``
    (reception to ``wall_ns``, ms), and ``source_ns``, the write time on the system clock
    (``None`` under sim time: the header stamp does not compare with it). Anything missing
    or malformed (another rmw, an older rclpy) gives ``{}`` / ``None`` instead of an error:
    the callback must never fail on it.
    """
    parts, publisher, sequence = {}, None, None
    if not info:
        return parts, publisher, sequence
    try:
        source = int(info.get('source_timestamp') or 0)
        received = int(info.get('received_timestamp') or 0)
        if source > 0 and received >= source:
            parts = {'middleware': (received - source) / 1e6,
                     'executor': (wall_ns - received) / 1e6,
                     'source_ns': None if sim_time else source}
        gid = info.get('publisher_gid')
        if isinstance(gid, dict) and gid.get('data') is not None:
            publisher = bytes(gid['data'])
        number = info.get('publication_sequence_number')
        sequence = None if number is None else int(number)
    except (AttributeError, TypeError, ValueError):
        return {}, None, None
    return parts, publisher, sequence


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def ros_header(header) -> Header:
    """Return an rclpy ``Header`` with the stamp and frame_id of any header (e.g. rosbags')."""
    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


def publish_image(publisher, array, encoding, header):
    """Publish an array as a serialized ``sensor_msgs/Image`` stamped with ``header``."""
    publisher.publish(encode_like(array, encoding, header))


def describe_error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f'{type(exc).__name__}: {text}'


class ThrottledLog:
    """Log at most one line per ``key`` every ``period_s``, saying how many were held back."""

    def __init__(self, logger, period_s: float = 5.0, clock=time.monotonic):
        self.logger = logger
        self.period_s = period_s
        self.clock = clock
        self._state = {}   # key -> [last_logged, suppressed]
        self._lock = threading.Lock()

    def __call__(self, key: str, text: str, level: str = 'warning') -> bool:
        now = self.clock()
        with self._lock:
            state = self._state.get(key)
            if state is not None and now - state[0] < self.period_s:
                state[1] += 1
                return False
            held = state[1] if state is not None else 0
            self._state[key] = [now, 0]
        if held:
            text += f' ({held} more like this in the last {self.period_s:g} s)'
        # One call site per severity: rclpy refuses a severity change at one call site.
        if level == 'info':
            self.logger.info(text)
        elif level == 'error':
            self.logger.error(text)
        else:
            self.logger.warning(text)
        return True


class StampMatcher:
    """
    Pair predictions with ground truth by header stamp, whichever arrives first.

    Keeps the newest ``capacity`` unmatched items of each kind; ``score(pred, gt)`` turns a
    pair into a number (or ``None`` to skip it). Thread safe.
    """

    def __init__(self, score, capacity: int = 30):
        self.score = score
        self.capacity = capacity
        self._pred = OrderedDict()
        self._gt = OrderedDict()
        self._lock = threading.Lock()

    def _add(self, mine, other, key, value, pred_first):
        with self._lock:
            if key in other:
                match = other.pop(key)
            else:
                mine[key] = value
                while len(mine) > self.capacity:
                    mine.popitem(last=False)
                return None
        pred, gt = (value, match) if pred_first else (match, value)
        return self.score(pred, gt)

    def add_prediction(self, key, value):
        return self._add(self._pred, self._gt, key, value, True)

    def add_ground_truth(self, key, value):
        return self._add(self._gt, self._pred, key, value, False)


class TakenByWorker(CallbackGroup):
    """A callback group that no executor runs: the node's worker takes its messages itself."""

    def can_execute(self, entity) -> bool:
        return False

    def beginning_execution(self, entity) -> bool:
        return False

    def ending_execution(self, entity) -> None:
        pass


class PerceptionNode(Node):
    """
    Base of ``lane_seg_node`` and ``flow_node``.

    Subclasses set the class attributes and implement :meth:`load_pipeline` and
    :meth:`process` (and optionally :meth:`create_outputs`, :meth:`params_changed`).

    ``own_process``: the node is the only one in its process (``spin_node``, i.e. the
    executables ``ros2 run`` and ``ros2 launch`` start), so ``cpu_affinity`` pins the whole
    process; otherwise (``lane-seg run``, a user's own composition) only the node's worker
    thread and the engine threads it starts are pinned, and the other nodes keep theirs.
    """

    SPECS = ()
    CONFIG = None
    TASK = 'pipeline'
    STAGES = ('conversion', 'preprocess', 'inference', 'postprocess', 'publish')

    def __init__(self, node_name, pipeline_factory=None, own_process=False, **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self._factory = pipeline_factory
        self._own_process = own_process
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        # (raw bytes, receive seq, receive monotonic time, ROS time ns, transport parts in ms)
        self._slot = None
        self._receive_seq = 0
        self._gaps = SequenceGaps()
        self._stop = False
        self.pipeline = None
        self.pipeline_info = {}
        self.throttled = ThrottledLog(self.get_logger())
        self.params = NodeParameters(self, self.SPECS, self.CONFIG, self._params_changed)
        cfg = self.params.config
        # parsed once, here: a bad list fails the start-up with the reason, never the worker
        self._cpus = parse_cpu_list(cfg.cpu_affinity)
        if self._cpus and own_process:
            self._pin(pin_process, self._cpus, 'process')
        callback = self._on_image_with_info if CALLBACK_WITH_INFO else self._on_image
        # receive 'worker': the worker waits on the subscription and takes each frame itself,
        # no executor hand-off; the executor still runs everything else (parameters, timers)
        self.receive = receive_mode(cfg.receive)
        self._taken_by_worker = self.receive == 'worker'
        group = TakenByWorker() if self._taken_by_worker else None
        self.subscription = self.create_subscription(
            Image, 'image', callback, input_qos(cfg.qos_reliability), raw=True,
            callback_group=group)
        # the worker's own wake-up at shutdown; not the node's, so no executor waits on it
        # (the EventsExecutor refuses a node's guard conditions)
        self._wake_worker = (GuardCondition(None, None, context=self.context)
                             if self._taken_by_worker else None)
        self._topic = self.subscription.topic_name
        self.stats = LatencyStats(window_s=cfg.window_s,
                                  latency_budget_ms=cfg.latency_budget_ms,
                                  stale_after_s=cfg.stale_after_s, stages=self.STAGES,
                                  input_name=self._topic)
        self.stats.info['receive'] = self.receive
        if cfg.receive == 'worker' and not LOST_FRAMES_COUNTED:
            self.get_logger().warning(
                'receive: worker on an rclpy without the publisher id in its message info: '
                'frames replaced in the subscription queue while the worker is busy are '
                'not counted (receive: executor counts them as dropped)')
        self.out_qos = output_qos(cfg.output_qos_reliability)
        self.create_outputs(cfg)
        self.diagnostics = DiagnosticsPublisher(self, self.diagnostic_status, task=self.TASK)
        self._worker = threading.Thread(target=self._run, name=f'{node_name}_worker',
                                        daemon=True)
        self._worker.start()

    def _pin(self, pin, cpus, what):
        """Run ``what`` (the process or the calling thread) on ``cpus`` with ``pin``."""
        try:
            pin(cpus)
        except OSError as exc:
            self.get_logger().warning(f'cpu_affinity not applied: {describe_error(exc)}')
            return
        self.get_logger().info(f'{what} pinned to CPU(s) {", ".join(map(str, sorted(cpus)))}')

    # -- for subclasses ------------------------------------------------------------------
    def create_outputs(self, cfg):
        """Create publishers and optional subscriptions (called once from ``__init__``)."""

    def load_pipeline(self, cfg):
        """Build and return the pipeline from ``cfg`` (runs in the worker thread)."""
        raise NotImplementedError

    def process(self, msg, image, seq, conversion_ms):
        """Run the pipeline on a decoded, accepted frame and publish; return stage times."""
        raise NotImplementedError

    def params_changed(self, old, new):
        """React to accepted parameter changes (called in the parameter service thread)."""

    # -- parameters ----------------------------------------------------------------------
    def _params_changed(self, old, new):
        with self._lock:
            self.stats.latency_budget_ms = new.latency_budget_ms
            self.stats.stale_after_s = new.stale_after_s
        changed = [n for n in new.names() if getattr(old, n) != getattr(new, n)]
        self.get_logger().info('parameters changed: ' + ', '.join(
            f'{n}={getattr(new, n)!r}' for n in changed))
        self.params_changed(old, new)

    # -- input ---------------------------------------------------------------------------
    def _on_image_with_info(self, raw, info):
        self._on_image(raw, info)

    def _on_image(self, raw, info=None):
        item = self._received(raw, info)
        if item is None:
            return
        with self._lock:
            if self._slot is not None:
                self.stats.dropped(1, item[2])
            self._slot = item
            self._wake.notify()

    def _received(self, raw, info):
        """Count a frame that arrived; return its work item, or None when it is refused."""
        now = time.monotonic()
        wall_ns = time.time_ns()
        clock = self.get_clock()
        arrived_ns = clock.now().nanoseconds
        sim_time = getattr(clock, 'ros_time_is_active', False)
        parts, publisher, sequence = message_info_parts(info, wall_ns, sim_time)
        with self._lock:
            self._receive_seq += 1
            self.stats.received(now)
            if publisher is not None and sequence is not None:
                self.stats.lost(self._gaps.update(publisher, sequence), now)
            if self.stats.startup_failure is not None:
                self.stats.rejected_frame('no_pipeline', now)
                return None
            return (raw, self._receive_seq, now, arrived_ns, parts)

    def _trigger_wake(self):
        wake = self._wake_worker
        if wake is None:
            return
        try:
            wake.trigger()
        except InvalidHandle:   # destroyed with the node
            pass

    def _take_loop(self):
        """
        Wait on the image subscription in this (the worker) thread and process each frame.

        Returns when the node stops or its context shuts down. Executors that ignore callback
        groups would take frames too; rclpy's (Kilted) EventsExecutor does, but it cannot run
        these nodes anyway (it fails on subscription callbacks that take message info).
        """
        sub, wake, context = self.subscription, self._wake_worker, self.context
        wait_set = None
        while not self._stop and context.ok():
            try:
                # held like rclpy's executor holds them: destruction waits for the release
                with sub.handle, wake.handle, context.handle:
                    if wait_set is None:
                        wait_set = _rclpy.WaitSet(1, 1, 0, 0, 0, 0, context.handle)
                    wait_set.clear_entities()
                    wait_set.add_subscription(sub.handle)
                    wait_set.add_guard_condition(wake.handle)
                    wait_set.wait(200_000_000)
                    if self._stop:
                        return
                    if sub.handle.pointer not in wait_set.get_ready_entities('subscription'):
                        continue
                    taken = sub.handle.take_message(Image, True)
            except InvalidHandle:   # the subscription or the node destroyed meanwhile
                return
            except Exception as exc:  # never die silently: say why frames stop
                self.get_logger().error(f'{self.TASK}: the worker stops taking frames: '
                                        f'{describe_error(exc)}')
                return
            if taken is None:
                continue
            raw, info = taken if isinstance(taken, tuple) else (taken, None)
            item = self._received(raw, info)
            if item is None:
                continue
            with self._lock:
                self.stats.set_busy(item[2])
            try:
                self._process_item(item)
            finally:
                with self._lock:
                    self.stats.set_busy(None)

    def reject(self, reason: str, text: str, msg=None):
        """Count a rejected frame under ``reason`` and log ``text`` (throttled per reason)."""
        with self._lock:
            self.stats.rejected_frame(reason)
            total = self.stats.rejected[reason]
        where = ''
        try:
            where = f' (stamp {msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d})'
        except (AttributeError, TypeError, ValueError):  # no usable header
            pass
        self.throttled(f'reject.{reason}', f'rejected frame{where}: {reason}: {text} '
                       f'[{total} rejected for {reason} so far]')

    def event(self, name: str, text: str = None, level: str = 'info'):
        """Count an event such as a reset or a resolution change; log it, throttled per name."""
        with self._lock:
            self.stats.event(name)
        if text:
            self.throttled(f'event.{name}', text, level)

    def decode(self, msg):
        """Decode and check an input image; ``None`` (after rejecting it) when unusable."""
        try:
            image = image_to_numpy(msg)
        except ImageConversionError as exc:
            known = isinstance(msg.encoding, str) and msg.encoding in SUPPORTED_ENCODINGS
            self.reject('malformed' if known else 'unsupported_encoding', str(exc), msg)
            return None
        if msg.encoding not in ACCEPTED_ENCODINGS:
            if image.dtype.kind == 'f' and not np.isfinite(image).all():
                bad = int(image.size - np.count_nonzero(np.isfinite(image)))
                self.reject('non_finite', f'{bad} NaN/inf values in a {msg.encoding} image',
                            msg)
            else:
                self.reject('unsupported_encoding',
                            f'{msg.encoding} images are not supported; send one of '
                            + ', '.join(ACCEPTED_ENCODINGS), msg)
            return None
        return image

    def end_to_end_ms(self, msg) -> float:
        return (self.get_clock().now().nanoseconds - stamp_ns(msg.header)) / 1e6

    # -- worker --------------------------------------------------------------------------
    def _load(self):
        cfg = self.params.config
        with self._lock:
            self.stats.set_building(f'loading the {self.TASK} model')
        t0 = time.monotonic()
        try:
            pipeline = self.load_pipeline(cfg)
        except Exception as exc:  # any start-up failure goes to /diagnostics, not a crash
            reason = describe_error(exc)
            with self._lock:
                self.stats.set_building(None)
                self.stats.set_startup_failure(reason)
            self.get_logger().error(
                f'cannot load the {self.TASK} pipeline: {reason}. The node stays up and '
                f'reports ERROR on /diagnostics; fix the parameters and restart it.')
            return None
        info = self._describe(pipeline)
        with self._lock:
            self.stats.set_building(None)
            self.stats.set_startup_failure(None)
            self.pipeline = pipeline
        self.get_logger().info(
            f'{self.TASK}: model {info.get("model", "?")}'
            + (f' (running {info["model_file"]})' if info.get('model_file') else '')
            + (f' (int8 kernels {info["int8_kernels"]})' if info.get('int8_kernels') else '')
            + ', backend '
            f'{info.get("backend", "?")}, precision {info.get("precision", "?")}, input '
            f'{info.get("input_size", "?")} (loaded in {time.monotonic() - t0:.2f} s); '
            f'listening on {self._topic} (frames received by the {self.receive} thread)')
        return pipeline

    def _describe(self, pipeline) -> dict:
        try:
            info = dict(pipeline.describe())
        except Exception as exc:
            info = {'describe_error': describe_error(exc)}
        # 'building': e.g. 'tensorrt int8, 12 s elapsed, serving on onnxruntime'; the
        # elapsed time is kept by the statistics (from the first report), not the text.
        building = info.pop('building', None)
        if building:
            building = 'building engine: ' + re.sub(r',?\s*\d+ s elapsed', '', str(building))
        keys = ('model', 'backend', 'precision', 'input_size')
        shown = {k: info[k] for k in keys if k in info}
        shown.update({k: v for k, v in info.items() if k not in shown})
        with self._lock:
            old_backend = self.pipeline_info.get('backend')
            self.pipeline_info = shown
            self.stats.info = {k: str(v) for k, v in shown.items() if v is not None}
            self.stats.info['receive'] = self.receive
            self.stats.set_building(building)
        if old_backend is not None and shown.get('backend') != old_backend:
            self.get_logger().info(f'{self.TASK}: backend switched from {old_backend} to '
                                   f'{shown.get("backend")}')
        return shown

    def _take(self):
        with self._lock:
            while self._slot is None and not self._stop:
                self._wake.wait(timeout=0.2)
            if self._stop:
                return None
            item, self._slot = self._slot, None
            return item

    def _run(self):
        if self._cpus and not self._own_process:   # before the engine starts its threads
            self._pin(pin_thread, self._cpus, f'{self.TASK} worker and engine threads')
        increment = self.params.config.worker_nice
        if increment:
            try:
                nice = lower_thread_priority(increment)
                self.get_logger().info(f'{self.TASK} worker thread at niceness {nice}')
            except OSError as exc:
                self.get_logger().warning(f'worker_nice {increment} not applied: '
                                          f'{describe_error(exc)}')
        if self._taken_by_worker:   # frames wait unseen in the subscription meanwhile
            with self._lock:
                self.stats.set_busy(time.monotonic())
        self._load()
        with self._lock:
            self.stats.set_busy(None)
        if self._taken_by_worker:
            self._take_loop()
            return
        while True:
            item = self._take()
            if item is None:
                return
            self._process_item(item)

    def _process_item(self, item):
        raw, seq, received, arrived_ns, parts = item
        if self.pipeline is None:
            with self._lock:
                self.stats.rejected_frame('no_pipeline')
            return
        t0 = time.perf_counter()
        queue_ms = (time.monotonic() - received) * 1e3
        try:
            msg = decode_image(raw)
        except ImageConversionError as exc:
            self.reject('malformed', str(exc))
            return
        try:
            self._handle(msg, seq, t0, queue_ms, arrived_ns, parts)
        except Exception as exc:  # a bug or engine failure on one frame: keep serving
            try:
                self.reject('pipeline_error', describe_error(exc), msg)
            except Exception:  # never let the worker die
                pass

    def _handle(self, msg, seq, t0, queue_ms, arrived_ns, parts):
        stamp = stamp_ns(msg.header)
        waits = {'queue': queue_ms, 'transport': (arrived_ns - stamp) / 1e6}
        if parts:
            waits['middleware'] = parts['middleware']
            waits['executor'] = parts['executor']
            if parts['source_ns'] is not None:
                waits['publisher'] = (parts['source_ns'] - stamp) / 1e6
        image = self.decode(msg)
        if image is None:
            return
        conversion_ms = (time.perf_counter() - t0) * 1e3
        stages = self.process(msg, image, seq, conversion_ms)
        if stages is None:
            return
        e2e = self.end_to_end_ms(msg)
        with self._lock:
            self.stats.processed(stages, e2e, wait_ms=waits)

    def rebuild_pipeline(self):
        """Replace the pipeline with one built from the current parameters (worker thread)."""
        cfg = self.params.config
        try:
            pipeline = self.load_pipeline(cfg)
        except Exception as exc:
            self.get_logger().error(f'{self.TASK}: keeping the old pipeline, the new '
                                    f'parameters do not load: {describe_error(exc)}')
            return
        old, self.pipeline = self.pipeline, pipeline
        self._describe(pipeline)
        if old is not None:
            old.close()

    # -- diagnostics ---------------------------------------------------------------------
    def diagnostic_status(self) -> Status:
        if self.pipeline is not None:
            self._describe(self.pipeline)
        with self._lock:
            return self.stats.status()

    def summary(self) -> dict:
        with self._lock:
            return self.stats.summary()

    # -- shutdown ------------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0):
        """Stop the worker and close the pipeline (idempotent; safe on a half-built node)."""
        worker = getattr(self, '_worker', None)
        if worker is None:
            return
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if getattr(self, '_wake_worker', None) is not None:
            self._trigger_wake()
        if worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout_s)
        wake = getattr(self, '_wake_worker', None)
        if wake is not None and not worker.is_alive():
            self._wake_worker = None
            wake.destroy()
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            try:
                pipeline.close()
            except Exception as exc:
                self.get_logger().warning(f'closing the pipeline: {describe_error(exc)}')

    def destroy_node(self):
        self.close()
        return super().destroy_node()


def level_name(level) -> str:
    return Level(level).name


def spin_node(node_cls, args=None, **node_kwargs) -> int:
    """
    Run a node alone in this process as ``main()`` does: init, spin, portable shutdown.

    Humble to Kilted; ``node_kwargs`` go to the node's constructor.
    """
    name = getattr(node_cls, 'NODE_NAME', node_cls.__name__)
    logger = rclpy.logging.get_logger(name)
    applied = tune_process(warn=logger.warning)
    logger.info('process settings: ' + ', '.join(f'{k}={v}' for k, v in applied.items()))
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = node_cls(**node_kwargs)
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # bad parameter file values and the like: say it, exit 2
        rclpy.logging.get_logger(name).fatal(f'{name} cannot start: {describe_error(exc)}')
        code = 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code
