"""
Node process settings (``lane_seg.process_tuning``): GIL switch interval, malloc, niceness.

The malloc test measures what the setting is for: the page faults a process takes per 1.9 MB
camera frame that rclpy delivers to a raw subscription, in a fresh interpreter with and
without the setting.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap
import threading

from helpers import ros_domain_env, thread_nice
from lane_seg.process_tuning import (GIL_SWITCH_DEFAULT_MS, GIL_SWITCH_ENV,
                                     keep_large_buffers, lower_thread_priority,
                                     M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MALLOC_KEEP_ENV,
                                     OPENCV_THREADS_ENV, parse_cpu_list, pin_thread,
                                     set_gil_switch_interval, set_opencv_threads)
import pytest

DOMAIN_ID = (os.getpid() + 13) % 50 + 120

FAULTS_PER_FRAME = textwrap.dedent("""
    import json, resource
    from lane_seg.process_tuning import keep_large_buffers
    kept = keep_large_buffers(warn=print)
    import numpy as np
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from lane_seg.image_cdr import encode_image
    rclpy.init()
    node = Node('malloc_faults')
    faults = []
    node.create_subscription(
        Image, 'frames', lambda raw: faults.append(resource.getrusage(
            resource.RUSAGE_SELF).ru_minflt), 1, raw=True)
    pub = node.create_publisher(Image, 'frames', 1)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    image = np.zeros((600, 800, 4), np.uint8)
    for i in range(40):
        pub.publish(encode_image(image, 'bgra8', 0, i))
        executor.spin_once(timeout_sec=2.0)
    steps = np.diff(faults[10:])
    print(json.dumps({'kept': kept, 'frames': len(faults),
                      'faults_per_frame': float(np.median(steps))}))
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()
""")


def faults_per_frame(keep_mb):
    with ros_domain_env(DOMAIN_ID):
        env = dict(os.environ, **{MALLOC_KEEP_ENV: keep_mb})
        proc = subprocess.run([sys.executable, '-c', FAULTS_PER_FRAME], env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='the setting is for glibc malloc')
def test_kept_buffers_take_frames_without_page_faults():
    tuned = faults_per_frame('')                   # the default
    untuned = faults_per_frame('0')
    assert tuned['kept'] == 8 and untuned['kept'] is None
    assert tuned['frames'] == untuned['frames'] == 40
    # an 800x600 bgra8 frame spans 469 pages of 4 KiB: without the setting every frame's
    # buffers (the publisher's bytes, the middleware's and rclpy's copies) are fresh pages
    assert untuned['faults_per_frame'] >= 469, untuned
    assert tuned['faults_per_frame'] < 50, tuned


class FakeLibc:

    def __init__(self, accept=True):
        self.calls = []
        self.accept = accept

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1 if self.accept else 0


def test_keep_large_buffers_setting_and_refusals():
    warnings = []
    libc = FakeLibc()
    assert keep_large_buffers({}, warnings.append, libc) == 8
    assert libc.calls == [(M_MMAP_THRESHOLD, 8 << 20), (M_TRIM_THRESHOLD, 16 << 20)]
    libc.calls.clear()
    assert keep_large_buffers({MALLOC_KEEP_ENV: ' 32 '}, warnings.append, libc) == 32
    assert libc.calls == [(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20)]
    libc.calls.clear()
    assert keep_large_buffers({MALLOC_KEEP_ENV: '0'}, warnings.append, libc) is None
    assert libc.calls == [] and warnings == []
    for bad in ('lots', '-1', '33', 'nan'):
        assert keep_large_buffers({MALLOC_KEEP_ENV: bad}, warnings.append, libc) == 8
    assert len(warnings) == 4
    assert all(w.startswith(f'{MALLOC_KEEP_ENV}=') and 'using 8 MiB' in w for w in warnings)
    warnings.clear()
    assert keep_large_buffers({}, warnings.append, FakeLibc(accept=False)) is None
    assert len(warnings) == 1 and 'mallopt refused' in warnings[0]


def test_opencv_threads_default_override_and_refusals():
    import cv2
    before = cv2.getNumThreads()
    warnings = []
    try:
        assert set_opencv_threads({}, warnings.append) == 1 and cv2.getNumThreads() == 1
        assert set_opencv_threads({OPENCV_THREADS_ENV: '2'}, warnings.append) == 2
        assert cv2.getNumThreads() == 2
        assert set_opencv_threads({OPENCV_THREADS_ENV: '0'}, warnings.append) is None
        assert cv2.getNumThreads() == 2 and warnings == []      # 0: left as it was
        for bad in ('many', '-1', '1.5', '1000'):
            assert set_opencv_threads({OPENCV_THREADS_ENV: bad}, warnings.append) == 1
        assert len(warnings) == 4 and all(w.startswith(f'{OPENCV_THREADS_ENV}=')
                                          for w in warnings)
    finally:
        cv2.setNumThreads(before)


def test_node_processes_apply_every_setting():
    # what a node's main() does, in a fresh interpreter: the settings as the process sees them
    code = textwrap.dedent("""
        import json, sys
        import cv2
        from lane_seg.process_tuning import tune_process
        applied = tune_process(warn=print)
        print(json.dumps({'applied': applied, 'switch': sys.getswitchinterval(),
                          'cv2_threads': cv2.getNumThreads()}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith('LANE_SEG_')}
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen['switch'] == pytest.approx(GIL_SWITCH_DEFAULT_MS / 1000.0)
    assert seen['cv2_threads'] == 1
    assert seen['applied']['opencv_threads'] == 1
    glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
    assert seen['applied']['malloc_keep_mb'] == (8 if glibc else None)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='per-thread niceness: Linux')
def test_lower_thread_priority_is_per_thread_and_inherited_by_new_threads():
    if thread_nice(threading.get_native_id()) > 17:
        pytest.skip('the tests already run at a niceness with no room for +2')
    seen = {}

    def child():
        seen['child'] = thread_nice(threading.get_native_id())

    def worker():
        before = thread_nice(threading.get_native_id())
        seen['new'] = lower_thread_priority(2)
        seen['expected'] = min(19, before + 2)
        inner = threading.Thread(target=child)
        inner.start()
        inner.join()

    main_nice = thread_nice(threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen['new'] == seen['expected'] == seen['child']
    assert thread_nice(threading.get_native_id()) == main_nice


@pytest.fixture
def switch_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_gil_switch_interval_default_override_and_refusals(switch_interval):
    warnings = []
    assert set_gil_switch_interval({}, warnings.append) == GIL_SWITCH_DEFAULT_MS == 1.0
    assert sys.getswitchinterval() == pytest.approx(0.001)
    assert set_gil_switch_interval({GIL_SWITCH_ENV: ' 2.5 '}, warnings.append) == 2.5
    assert sys.getswitchinterval() == pytest.approx(0.0025)
    assert warnings == []
    for bad in ('fast', '0', '-1', '1000', 'nan', 'inf'):
        sys.setswitchinterval(0.005)
        assert set_gil_switch_interval({GIL_SWITCH_ENV: bad}, warnings.append) == 1.0
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert len(warnings) == 6
    assert all(w.startswith(f'{GIL_SWITCH_ENV}=') and 'using 1 ms' in w for w in warnings)


def test_cpu_lists_parse_like_taskset_and_name_what_is_wrong():
    assert parse_cpu_list('') == frozenset() and parse_cpu_list('  ') == frozenset()
    first = min(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 0
    assert parse_cpu_list(str(first)) == {first}
    assert parse_cpu_list(f' {first} , {first}-{first} ') == {first}
    for bad, why in (('x', 'not a CPU list'), ('1-0', 'rising range'), ('-1', 'not a CPU'),
                     ('0,,1', 'not a CPU list')):
        with pytest.raises(ValueError, match=why):
            parse_cpu_list(bad)
    if hasattr(os, 'sched_getaffinity'):
        with pytest.raises(ValueError, match='not available to this process'):
            parse_cpu_list('100000')


@pytest.mark.skipif(not sys.platform.startswith('linux') or len(os.sched_getaffinity(0)) < 2,
                    reason='CPU affinity: Linux, two CPUs at least')
def test_pin_thread_pins_the_calling_thread_and_the_threads_it_starts_only():
    everything = os.sched_getaffinity(0)
    cpu = max(everything)
    seen = {}

    def child():
        seen['child'] = os.sched_getaffinity(0)

    def worker():
        seen['tid'] = pin_thread({cpu})
        seen['worker'] = os.sched_getaffinity(0)
        inner = threading.Thread(target=child)
        inner.start()
        inner.join()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen['worker'] == seen['child'] == {cpu}
    assert seen['tid'] == thread.native_id
    assert os.sched_getaffinity(0) == everything   # the calling thread of the test kept its own
