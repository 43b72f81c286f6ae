"""
Latency and health statistics of a perception node (pure: no rclpy, no message types).

A node feeds one :class:`LatencyStats` with what happens to its frames: ``received`` when a
message arrives, ``dropped`` when an unprocessed frame is overwritten by a newer one, ``lost``
when the publisher wrote frames that never reached the node's callback (gaps in its
publication sequence numbers, see :class:`SequenceGaps`: overwritten in the middleware's
depth-1 queue, or lost in transport),
``rejected`` (with a reason) when a frame cannot be used, ``processed`` with the per-stage
times, the end-to-end latency (node clock minus header stamp) and where a frame waited before
processing (``transport``: header stamp to the subscription callback, i.e. the publisher,
middleware and executor; ``queue``: callback to the start of processing, i.e. waiting for the
previous frame; where the middleware reports its timestamps, ``transport`` splits into
``publisher``: header stamp to the publisher's write, ``middleware``: write to reception by the
node's middleware, ``executor``: reception to the callback), ``event`` for things worth
counting that are not errors (a pipeline reset, a resolution change), ``metric`` for live
accuracy figures (IoU, EPE). All figures are kept over a rolling time window.

:meth:`LatencyStats.status` turns them into a diagnostic level, a one-line message and
key/value pairs (the fields of a ``diagnostic_msgs/DiagnosticStatus``):

- ERROR when a start-up failure is set (missing model, unusable backend), or no frame has
  arrived for ``stale_after_s`` (also before the first frame, counted from start-up) while
  the receiver is not busy (:meth:`LatencyStats.set_busy`);
- WARN while an engine is being built (with the elapsed time), while the receiver has been
  busy with one frame for more than ``stale_after_s``, when the window's end-to-end
  p95 exceeds the latency budget, or when frames were dropped or lost within the window;
- OK otherwise.

Times passed in are seconds on a monotonic clock (``time.monotonic()`` unless given); the
caller measures latencies in milliseconds.
"""

from collections import Counter, deque, OrderedDict
from dataclasses import dataclass
import enum
import math
import time

import numpy as np

STAGES = ('conversion', 'preprocess', 'inference', 'postprocess', 'publish')
SPLIT_WAITS = ('publisher', 'middleware', 'executor')   # the parts of 'transport'
WAITS = ('transport', 'queue', 'total') + SPLIT_WAITS
PERCENTILES = (50, 95, 99)


class Level(enum.IntEnum):
    """Diagnostic levels, numerically equal to ``diagnostic_msgs/DiagnosticStatus``."""

    OK = 0
    WARN = 1
    ERROR = 2


@dataclass(frozen=True)
class Status:
    """A diagnostic verdict: level, one-line message and ordered key/value strings."""

    level: Level
    message: str
    values: tuple  # ((key, value_str), ...)

    def as_dict(self) -> dict:
        return dict(self.values)


def percentiles(values) -> dict:
    """Return ``{'p50', 'p95', 'p99', 'max', 'mean'}`` of ``values`` (NaN when empty)."""
    arr = np.sort(np.asarray(list(values), np.float64))
    if arr.size == 0:
        out = {f'p{q}': math.nan for q in PERCENTILES}
        out.update(max=math.nan, mean=math.nan)
        return out
    # numpy's default ('linear') percentile on the sorted samples, without np.percentile's
    # per-call overhead: /diagnostics computes a dozen of these under the node's lock each
    # second (2.3 ms with np.percentile for a 10-s window at 30 Hz).
    out = {}
    last = arr.size - 1
    for q in PERCENTILES:
        pos = q / 100.0 * last
        lo = int(pos)
        hi = min(lo + 1, last)
        out[f'p{q}'] = float(arr[lo] + (arr[hi] - arr[lo]) * (pos - lo))
    out.update(max=float(arr[-1]), mean=float(arr.mean()))
    return out


class RollingWindow:
    """Timestamped samples, kept for ``window_s`` seconds (and at most ``max_samples``)."""

    def __init__(self, window_s: float, max_samples: int = 10000):
        if window_s <= 0:
            raise ValueError(f'window_s={window_s} must be > 0')
        self.window_s = float(window_s)
        self._samples = deque(maxlen=max_samples)

    def add(self, now: float, value: float = 1.0):
        self._samples.append((now, float(value)))
        self.prune(now)

    def prune(self, now: float):
        horizon = now - self.window_s
        samples = self._samples
        while samples and samples[0][0] < horizon:
            samples.popleft()

    def values(self, now: float) -> list:
        self.prune(now)
        return [v for _, v in self._samples]

    def count(self, now: float) -> int:
        self.prune(now)
        return len(self._samples)

    def total(self, now: float) -> float:
        return float(sum(self.values(now)))

    def rate(self, now: float) -> float:
        """Events per second over the samples in the window (0 with fewer than two)."""
        self.prune(now)
        n = len(self._samples)
        if n < 2:
            return 0.0
        span = self._samples[-1][0] - self._samples[0][0]
        return (n - 1) / span if span > 0 else 0.0


class SequenceGaps:
    """
    Count the messages a subscriber never saw, from the publishers' sequence numbers.

    DDS numbers every sample a writer sends (``publication_sequence_number`` in rclpy's
    message info, per ``publisher_gid``). A depth-1 subscription whose callback runs late
    finds only the newest sample: the middleware overwrote the others without telling
    anyone. :meth:`update` returns how many numbers were skipped since the publisher's last
    message (0 for its first, for a number that is not newer, or without a publisher or
    number). The newest ``max_publishers`` publishers are remembered.
    """

    def __init__(self, max_publishers: int = 32):
        self.max_publishers = int(max_publishers)
        self._last = OrderedDict()

    def update(self, publisher, sequence) -> int:
        if publisher is None or sequence is None:
            return 0
        sequence = int(sequence)
        last = self._last.pop(publisher, None)
        self._last[publisher] = sequence if last is None else max(last, sequence)
        while len(self._last) > self.max_publishers:
            self._last.popitem(last=False)
        if last is None or sequence <= last:
            return 0
        return sequence - last - 1


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return f'{value:.{digits}f}'


class LatencyStats:
    """
    Rolling per-stage timings, end-to-end latency, rates, drops and rejections of one node.

    Not thread safe by itself: a node calls it from its callbacks and worker under one lock
    (``lane_seg.ros`` does), or from one thread.
    """

    def __init__(self, window_s: float = 10.0, latency_budget_ms: float = 50.0,
                 stale_after_s: float = 2.0, stages=STAGES, clock=time.monotonic,
                 input_name: str = 'image'):
        self.clock = clock
        self.window_s = float(window_s)
        self.latency_budget_ms = float(latency_budget_ms)
        self.stale_after_s = float(stale_after_s)
        self.stages = tuple(stages)
        self.input_name = input_name
        self.started_at = clock()
        self._stage = {name: RollingWindow(window_s) for name in self.stages}
        self._e2e = RollingWindow(window_s)
        self._processing = RollingWindow(window_s)   # per frame: the sum of its stages
        self._waits = {name: RollingWindow(window_s) for name in WAITS}
        self._received = RollingWindow(window_s)
        self._processed = RollingWindow(window_s)
        self._dropped = RollingWindow(window_s)
        self._lost = RollingWindow(window_s)
        self._rejected_window = RollingWindow(window_s)
        self._metrics = {}
        self.received_total = 0
        self.processed_total = 0
        self.dropped_total = 0
        self.lost_total = 0
        self.lost_counted = False   # whether the middleware lets the node count lost frames
        self.rejected = Counter()
        self.events = Counter()
        self.last_received_at = None
        self.startup_failure = None
        self.building = None   # (message, started_at)
        self.busy_since = None  # set while frames wait unseen (see set_busy)
        self.info = {}         # static facts shown in diagnostics (model, backend, ...)

    # -- recording -----------------------------------------------------------------------
    def _now(self, now):
        return self.clock() if now is None else now

    def received(self, now: float = None):
        now = self._now(now)
        self.received_total += 1
        self.last_received_at = now
        self._received.add(now)

    def dropped(self, count: int = 1, now: float = None):
        if count <= 0:
            return
        now = self._now(now)
        self.dropped_total += count
        self._dropped.add(now, count)

    def lost(self, count: int = 1, now: float = None):
        """
        Count frames that were published but never reached the node (see SequenceGaps).

        Any call, ``count`` 0 included, marks lost frames as counted: the diagnostics show
        ``frames_lost`` from then on (a node whose middleware gives no sequence numbers and
        publisher ids never calls it, and shows no such figure rather than a false 0).
        """
        self.lost_counted = True
        if count <= 0:
            return
        now = self._now(now)
        self.lost_total += count
        self._lost.add(now, count)

    def rejected_frame(self, reason: str, now: float = None):
        now = self._now(now)
        self.rejected[reason] += 1
        self._rejected_window.add(now)

    def event(self, name: str):
        self.events[name] += 1

    def processed(self, stage_ms: dict, end_to_end_ms: float = None, now: float = None,
                  wait_ms: dict = None):
        """
        Record one processed frame: ``stage_ms`` maps stage names to milliseconds.

        ``wait_ms`` (optional) maps ``transport`` and ``queue`` (and, where known, the parts
        of ``transport``: ``publisher``, ``middleware``, ``executor``) to the milliseconds
        the frame spent before processing (non-finite values are skipped); with ``transport``
        and ``queue``, their sum is kept as ``total``, the per-frame part of the end-to-end
        latency that is not processing.
        """
        now = self._now(now)
        wait_ms = dict(wait_ms or {})
        if 'transport' in wait_ms and 'queue' in wait_ms:
            wait_ms.setdefault('total', wait_ms['transport'] + wait_ms['queue'])
        for name, value in wait_ms.items():
            if name not in WAITS:
                raise ValueError(f'unknown wait {name!r}: expected one of {WAITS}')
            if value is not None and math.isfinite(value):
                self._waits[name].add(now, value)
        self.processed_total += 1
        self._processed.add(now)
        for name, value in stage_ms.items():
            if name not in self._stage:
                self._stage[name] = RollingWindow(self.window_s)
            self._stage[name].add(now, value)
        if stage_ms:
            self._processing.add(now, sum(stage_ms.values()))
        if end_to_end_ms is not None and math.isfinite(end_to_end_ms):
            self._e2e.add(now, end_to_end_ms)

    def metric(self, name: str, value: float, now: float = None):
        """Record a live accuracy figure (e.g. ``iou``, ``epe``); reported as window mean."""
        now = self._now(now)
        if name not in self._metrics:
            self._metrics[name] = RollingWindow(self.window_s)
        self._metrics[name].add(now, value)

    def set_startup_failure(self, reason):
        """Set (or with ``None`` clear) a start-up failure; it makes the status ERROR."""
        self.startup_failure = None if reason is None else str(reason)

    def set_busy(self, since):
        """
        Mark the receiver busy since ``since`` (monotonic s), or idle with None.

        For a node whose worker takes its frames itself: while it is busy, frames wait in the
        subscription unseen, so silence is not staleness; a busy spell longer than
        ``stale_after_s`` is reported (WARN) instead.
        """
        self.busy_since = since

    def set_building(self, message, now: float = None):
        """Mark a long start-up step (engine build) in progress; ``None`` ends it."""
        if message is None:
            self.building = None
        elif self.building is None or self.building[0] != message:
            self.building = (str(message), self._now(now))

    # -- reading -------------------------------------------------------------------------
    def stage_percentiles(self, now: float = None) -> dict:
        now = self._now(now)
        return {name: percentiles(win.values(now)) for name, win in self._stage.items()}

    def end_to_end(self, now: float = None) -> dict:
        return percentiles(self._e2e.values(self._now(now)))

    def processing(self, now: float = None) -> dict:
        """Return the percentiles of each frame's own processing time (its stages' sum)."""
        return percentiles(self._processing.values(self._now(now)))

    def wait_percentiles(self, now: float = None) -> dict:
        now = self._now(now)
        return {name: percentiles(win.values(now)) for name, win in self._waits.items()}

    def input_rate(self, now: float = None) -> float:
        return self._received.rate(self._now(now))

    def output_rate(self, now: float = None) -> float:
        return self._processed.rate(self._now(now))

    def dropped_in_window(self, now: float = None) -> int:
        return int(self._dropped.total(self._now(now)))

    def lost_in_window(self, now: float = None) -> int:
        return int(self._lost.total(self._now(now)))

    def metrics(self, now: float = None) -> dict:
        now = self._now(now)
        out = {}
        for name, win in self._metrics.items():
            vals = win.values(now)
            out[name] = float(np.mean(vals)) if vals else math.nan
        return out

    def summary(self, now: float = None) -> dict:
        """Every figure as plain JSON-ready numbers (NaN where there is no data yet)."""
        now = self._now(now)
        return {
            'window_s': self.window_s,
            'latency_budget_ms': self.latency_budget_ms,
            'received': self.received_total,
            'processed': self.processed_total,
            'dropped': self.dropped_total,
            'dropped_in_window': self.dropped_in_window(now),
            'lost': self.lost_total if self.lost_counted else None,
            'lost_in_window': self.lost_in_window(now) if self.lost_counted else None,
            'rejected': dict(self.rejected),
            'events': dict(self.events),
            'input_rate_hz': self.input_rate(now),
            'output_rate_hz': self.output_rate(now),
            'end_to_end_ms': self.end_to_end(now),
            'processing_ms': self.processing(now),
            'stages_ms': self.stage_percentiles(now),
            'waits_ms': self.wait_percentiles(now),
            'metrics': self.metrics(now),
            'startup_failure': self.startup_failure,
            'info': dict(self.info),
        }

    def status(self, now: float = None) -> Status:
        """Level, message and key/values by the rules in the module docstring."""
        now = self._now(now)
        e2e = self.end_to_end(now)
        dropped = self.dropped_in_window(now)
        lost = self.lost_in_window(now)
        since = now - (self.last_received_at if self.last_received_at is not None
                       else self.started_at)
        problems = []
        level = Level.OK
        if self.startup_failure is not None:
            level = Level.ERROR
            problems.append(f'start-up failed: {self.startup_failure}')
        busy = None if self.busy_since is None else now - self.busy_since
        if busy is not None and busy > self.stale_after_s and self.building is None:
            level = max(level, Level.WARN)
            problems.append(f'busy with one frame for {busy:.1f} s (frames arriving meanwhile '
                            f'are seen when it is done)')
        if since > self.stale_after_s and busy is None:
            level = Level.ERROR
            what = 'no frame received' if self.last_received_at is None else 'no frame'
            problems.append(f'{what} on {self.input_name} for {since:.1f} s '
                            f'(stale after {self.stale_after_s:g} s)')
        if self.building is not None:
            level = max(level, Level.WARN)
            problems.append(f'{self.building[0]} ({now - self.building[1]:.0f} s elapsed)')
        if not math.isnan(e2e['p95']) and e2e['p95'] > self.latency_budget_ms:
            level = max(level, Level.WARN)
            problems.append(f'end-to-end p95 {e2e["p95"]:.1f} ms > budget '
                            f'{self.latency_budget_ms:g} ms')
        if dropped:
            level = max(level, Level.WARN)
            problems.append(f'{dropped} frames dropped in the last {self.window_s:g} s')
        if lost:
            level = max(level, Level.WARN)
            problems.append(f'{lost} frames lost before reaching the node (replaced in the '
                            f'subscription queue or lost in transport) in the last '
                            f'{self.window_s:g} s')
        if problems:
            message = '; '.join(problems)
        elif self.last_received_at is None:
            message = 'waiting for the first frame'
        else:
            message = (f'ok: {self.output_rate(now):.1f} Hz out, end-to-end p95 '
                       f'{_fmt(e2e["p95"], 1)} ms')
        return Status(level, message, tuple(self._values(now, e2e, dropped, lost, since)))

    def _values(self, now, e2e, dropped, lost, since):
        for key, value in self.info.items():
            yield key, str(value)
        yield 'input_rate_hz', _fmt(self.input_rate(now))
        yield 'output_rate_hz', _fmt(self.output_rate(now))
        yield 'frames_received', str(self.received_total)
        yield 'frames_processed', str(self.processed_total)
        yield 'frames_dropped', str(self.dropped_total)
        yield 'frames_dropped_in_window', str(dropped)
        if self.lost_counted:
            yield 'frames_lost', str(self.lost_total)
            yield 'frames_lost_in_window', str(lost)
        yield 'frames_rejected', str(sum(self.rejected.values()))
        for reason in sorted(self.rejected):
            yield f'rejected.{reason}', str(self.rejected[reason])
        for name in sorted(self.events):
            yield f'events.{name}', str(self.events[name])
        yield 'seconds_since_last_frame', _fmt(since, 1)
        yield 'latency_budget_ms', f'{self.latency_budget_ms:g}'
        yield 'window_s', f'{self.window_s:g}'
        for q in ('p50', 'p95', 'p99', 'max'):
            yield f'end_to_end_ms.{q}', _fmt(e2e[q])
        processing = self.processing(now)
        for q in ('p50', 'p95', 'p99', 'max'):
            yield f'processing_ms.{q}', _fmt(processing[q])
        for name, pct in self.stage_percentiles(now).items():
            for q in ('p50', 'p95', 'p99', 'max'):
                yield f'{name}_ms.{q}', _fmt(pct[q])
        for name, pct in self.wait_percentiles(now).items():
            if name in SPLIT_WAITS and math.isnan(pct['p50']):
                continue   # the middleware gives no timestamps (or sim time): not shown
            for q in ('p50', 'p95', 'p99', 'max'):
                yield f'{name}_wait_ms.{q}', _fmt(pct[q])
        for name, value in sorted(self.metrics(now).items()):
            yield name, _fmt(value, 4)
        if self.startup_failure is not None:
            yield 'startup_failure', self.startup_failure
        if self.building is not None:
            yield 'building', self.building[0]
            yield 'building_elapsed_s', _fmt(now - self.building[1], 1)
