"""Pure tests of lane_seg.latency: rolling statistics and the diagnostic rules of issue 6."""

import math
import subprocess
import sys

from lane_seg.latency import (LatencyStats, Level, percentiles, RollingWindow, SequenceGaps,
                              STAGES)
import numpy as np
import pytest


class FakeClock:

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make(**kwargs):
    clock = FakeClock()
    kwargs.setdefault('window_s', 10.0)
    kwargs.setdefault('latency_budget_ms', 50.0)
    kwargs.setdefault('stale_after_s', 2.0)
    return LatencyStats(clock=clock, **kwargs), clock


def feed(stats, clock, count, period_s=0.05, e2e_ms=10.0, stage_ms=1.0):
    for _ in range(count):
        clock.t += period_s
        stats.received()
        stats.processed({name: stage_ms for name in STAGES}, e2e_ms)


def test_module_is_pure():
    code = ('import sys, lane_seg.latency; '
            'sys.exit(any(m in sys.modules for m in ("rclpy", "torch")))')
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0


def test_percentiles_match_numpy_and_empty_is_nan():
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 7, 20, 1000):
        values = rng.exponential(10.0, size)
        pct = percentiles(values)
        for q in (50, 95, 99):
            assert pct[f'p{q}'] == pytest.approx(np.percentile(values, q), rel=1e-12)
        assert pct['max'] == values.max() and pct['mean'] == pytest.approx(values.mean())
    assert percentiles([4.0, 4.0, 1.0])['p50'] == 4.0   # unsorted input, ties
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_rolling_window_forgets_old_samples_and_measures_rate():
    win = RollingWindow(2.0)
    for i in range(40):
        win.add(i * 0.25, i)
    # At t = 9.75 the samples from t = 7.75 on (i = 31 .. 39) remain: 4 per second.
    assert win.values(9.75) == list(range(31, 40))
    assert win.rate(9.75) == pytest.approx(4.0)
    assert win.count(12.0) == 0 and win.rate(12.0) == 0.0
    with pytest.raises(ValueError):
        RollingWindow(0)


def test_ok_status_with_every_field():
    stats, clock = make()
    stats.info = {'model': 'lane_unet_int8', 'backend': 'onnxruntime', 'precision': 'int8'}
    feed(stats, clock, 100, e2e_ms=12.0, stage_ms=2.0)
    status = stats.status()
    assert status.level == Level.OK
    assert status.message.startswith('ok: 20.0 Hz out')
    values = status.as_dict()
    for key in ['model', 'backend', 'precision', 'input_rate_hz', 'output_rate_hz',
                'frames_received', 'frames_processed', 'frames_dropped', 'frames_rejected',
                'end_to_end_ms.p50', 'end_to_end_ms.p95', 'end_to_end_ms.p99',
                'end_to_end_ms.max', 'latency_budget_ms', 'seconds_since_last_frame']:
        assert key in values, key
    for stage in STAGES:
        for q in ('p50', 'p95', 'p99', 'max'):
            assert values[f'{stage}_ms.{q}'] == '2.00'
    assert values['input_rate_hz'] == '20.00' and values['end_to_end_ms.p95'] == '12.00'
    assert values['frames_processed'] == '100' and values['frames_dropped'] == '0'


def test_warn_when_p95_exceeds_budget_then_recovers_after_the_window():
    stats, clock = make(latency_budget_ms=50.0)
    feed(stats, clock, 90, e2e_ms=20.0)
    feed(stats, clock, 10, e2e_ms=80.0)       # 10 % slow frames: p95 is slow
    status = stats.status()
    assert status.level == Level.WARN
    assert 'end-to-end p95 80.0 ms > budget 50 ms' in status.message
    feed(stats, clock, 400, e2e_ms=20.0)      # 20 s of fast frames: out of the window
    assert stats.status().level == Level.OK


def test_warn_on_drops_within_the_window_only():
    stats, clock = make()
    feed(stats, clock, 10)
    stats.dropped(3)
    status = stats.status()
    assert status.level == Level.WARN
    assert '3 frames dropped in the last 10 s' in status.message
    assert status.as_dict()['frames_dropped_in_window'] == '3'
    feed(stats, clock, 250)                   # 12.5 s later
    status = stats.status()
    assert status.level == Level.OK
    assert status.as_dict()['frames_dropped'] == '3'
    assert status.as_dict()['frames_dropped_in_window'] == '0'


def test_error_when_no_frame_for_stale_after_s():
    stats, clock = make(stale_after_s=2.0)
    assert stats.status().level == Level.OK
    assert stats.status().message == 'waiting for the first frame'
    clock.t += 2.5
    status = stats.status()
    assert status.level == Level.ERROR
    assert 'no frame received on image for 2.5 s' in status.message
    feed(stats, clock, 5)
    assert stats.status().level == Level.OK
    clock.t += 3.0
    status = stats.status()
    assert status.level == Level.ERROR and 'no frame on image for 3.0 s' in status.message


def test_a_busy_receiver_is_not_stale_but_a_long_busy_spell_warns():
    # a worker that takes its own frames sees none while busy: silence then is no staleness
    stats, clock = make(stale_after_s=2.0)
    feed(stats, clock, 5)
    stats.set_busy(clock.t)
    clock.t += 1.0
    assert stats.status().level == Level.OK
    clock.t += 2.0
    status = stats.status()
    assert status.level == Level.WARN
    assert 'busy with one frame for 3.0 s' in status.message and 'no frame' not in status.message
    stats.set_busy(None)     # done, and nothing waited meanwhile: stale since the last frame
    status = stats.status()
    assert status.level == Level.ERROR and 'no frame on image for 3.0 s' in status.message
    # while an engine is built, the building line says it all
    stats.set_busy(clock.t)
    stats.set_building('building the TensorRT engine', clock.t)
    clock.t += 5.0
    status = stats.status()
    assert status.level == Level.WARN and 'busy' not in status.message
    assert 'building the TensorRT engine' in status.message


def test_error_on_startup_failure_even_while_frames_arrive():
    stats, clock = make()
    stats.set_startup_failure('EngineError: /models/x.onnx not found')
    feed(stats, clock, 5)
    status = stats.status()
    assert status.level == Level.ERROR
    assert status.message.startswith('start-up failed: EngineError: /models/x.onnx')
    assert status.as_dict()['startup_failure'] == 'EngineError: /models/x.onnx not found'
    stats.set_startup_failure(None)
    assert stats.status().level == Level.OK


def test_building_engine_warns_with_elapsed_time():
    stats, clock = make(stale_after_s=600.0)
    stats.set_building('building engine: tensorrt int8')
    clock.t += 42.0
    status = stats.status()
    assert status.level == Level.WARN
    assert status.message == 'building engine: tensorrt int8 (42 s elapsed)'
    assert status.as_dict()['building_elapsed_s'] == '42.0'
    stats.set_building('building engine: tensorrt int8')   # same message: timer kept
    assert '42 s elapsed' in stats.status().message
    stats.set_building(None)
    assert stats.status().level == Level.OK


def test_rejections_events_and_metrics_are_reported():
    stats, clock = make()
    feed(stats, clock, 5)
    stats.rejected_frame('malformed')
    stats.rejected_frame('malformed')
    stats.rejected_frame('non_finite')
    stats.event('resolution_change')
    stats.metric('iou', 0.5)
    stats.metric('iou', 0.7)
    values = stats.status().as_dict()
    assert values['frames_rejected'] == '3'
    assert values['rejected.malformed'] == '2' and values['rejected.non_finite'] == '1'
    assert values['events.resolution_change'] == '1'
    assert values['iou'] == '0.6000'
    summary = stats.summary()
    assert summary['rejected'] == {'malformed': 2, 'non_finite': 1}
    assert summary['metrics']['iou'] == pytest.approx(0.6)
    assert stats.status().level == Level.OK     # rejections alone are not a failure


def test_rates_and_end_to_end_percentiles_over_the_window():
    stats, clock = make(window_s=5.0)
    for i in range(200):                      # 60 Hz in, every third frame processed
        clock.t += 1 / 60
        stats.received()
        if i % 3 == 0:
            stats.processed({'inference': 30.0}, float(i % 7))
        else:
            stats.dropped()
    assert stats.input_rate() == pytest.approx(60.0, rel=0.01)
    assert stats.output_rate() == pytest.approx(20.0, rel=0.02)
    e2e = stats.end_to_end()
    assert e2e['max'] == 6.0 and 0.0 <= e2e['p50'] <= 6.0
    assert stats.dropped_in_window() == 133 and stats.dropped_total == 133


def test_transport_and_queue_waits_and_their_per_frame_total():
    stats, clock = make()
    for i in range(50):
        clock.t += 0.05
        stats.received()
        stats.processed({'inference': 5.0}, 5.0 + i + 2 * i,
                        wait_ms={'transport': float(i), 'queue': 2.0 * i})
    waits = stats.wait_percentiles()
    assert waits['transport']['max'] == 49.0 and waits['queue']['max'] == 98.0
    # the total is per frame (transport + queue of the same frame), not a sum of percentiles
    assert waits['total']['max'] == 147.0
    assert waits['total']['p50'] == pytest.approx(np.percentile([3.0 * i for i in range(50)],
                                                                50))
    values = stats.status().as_dict()
    for name in ('transport', 'queue', 'total'):
        for q in ('p50', 'p95', 'p99', 'max'):
            assert f'{name}_wait_ms.{q}' in values
    # the parts of the transport are shown only when the middleware gave its timestamps
    assert not any(k.startswith(('publisher_wait', 'middleware_wait', 'executor_wait'))
                   for k in values)
    assert values['total_wait_ms.max'] == '147.00'
    assert stats.summary()['waits_ms']['queue']['max'] == 98.0


def test_waits_skip_non_finite_values_and_reject_unknown_names():
    stats, clock = make()
    stats.processed({'inference': 1.0}, 3.0, wait_ms={'transport': float('nan'), 'queue': 1.0})
    waits = stats.wait_percentiles()
    assert math.isnan(waits['transport']['p50']) and math.isnan(waits['total']['p50'])
    assert waits['queue']['p50'] == 1.0
    with pytest.raises(ValueError, match='unknown wait'):
        stats.processed({}, 1.0, wait_ms={'network': 1.0})


def test_transport_parts_are_kept_and_shown_when_given():
    stats, clock = make()
    for i in range(20):
        clock.t += 0.05
        stats.received()
        stats.processed({'inference': 5.0}, 9.0, wait_ms={
            'transport': 3.0, 'queue': 1.0, 'publisher': 0.5, 'middleware': 0.5 + i / 10,
            'executor': 2.0})
    values = stats.status().as_dict()
    assert values['middleware_wait_ms.max'] == '2.40' and values['executor_wait_ms.p50'] == '2.00'
    assert values['publisher_wait_ms.p95'] == '0.50'
    assert stats.summary()['waits_ms']['total']['p50'] == 4.0


def test_sequence_gaps_count_what_each_publisher_sent_that_never_arrived():
    gaps = SequenceGaps(max_publishers=2)
    assert gaps.update(b'a', 1) == 0                   # the first message of a publisher
    assert gaps.update(b'a', 2) == 0
    assert gaps.update(b'a', 6) == 3                   # 3, 4 and 5 never arrived
    assert gaps.update(b'b', 100) == 0                 # another publisher, its own numbers
    assert gaps.update(b'a', 7) == 0
    assert gaps.update(b'a', 5) == 0 and gaps.update(b'a', 9) == 1   # old number: no credit
    assert gaps.update(None, 12) == 0 and gaps.update(b'a', None) == 0
    assert gaps.update(b'c', 1) == 0                   # a third publisher evicts 'b' ...
    assert gaps.update(b'b', 200) == 0                 # ... which starts afresh
    assert gaps.update(b'a', 10) == 0                  # 'a' was evicted by 'b' in turn


def test_lost_frames_are_counted_and_make_a_warning():
    stats, clock = make()
    stats.received()
    stats.processed({'inference': 1.0}, 2.0)
    # not counted yet (a middleware without publisher ids): no figure rather than a false 0
    assert 'frames_lost' not in stats.status().as_dict() and stats.summary()['lost'] is None
    stats.lost(0)
    assert stats.status().level == Level.OK
    assert stats.status().as_dict()['frames_lost'] == '0'
    stats.lost(3)
    status = stats.status()
    assert status.level == Level.WARN
    assert '3 frames lost before reaching the node' in status.message
    values = status.as_dict()
    assert values['frames_lost'] == '3' and values['frames_lost_in_window'] == '3'
    clock.t += 11.0                                    # out of the 10-s window
    stats.received()
    assert stats.status().as_dict()['frames_lost_in_window'] == '0'
    assert stats.summary()['lost'] == 3 and stats.summary()['lost_in_window'] == 0
