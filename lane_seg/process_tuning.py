"""
Process settings of a node process that the interpreter and the C library get wrong for it.

Four knobs, the first three measured at 30 Hz of 800x600 ``bgra8`` frames on 2 cores
(``docs/bench/node_soak.md``); no rclpy import:

* :func:`set_gil_switch_interval`: Python hands the GIL from a busy thread to a waiting one
  every switch interval (5 ms by default). A node's executor thread (subscription callbacks)
  and its worker (conversion, pre/post-processing, publishing) share the GIL, so with the
  default every frame could wait up to 5 ms for its callback or for the worker to wake. At
  1 ms the p95 of stamp-to-processing per frame went from 6.2/6.2 ms (lanes/flow) to 6.0/5.3 ms
  over 10 minutes. ``LANE_SEG_GIL_SWITCH_MS`` overrides it.
* :func:`keep_large_buffers`: glibc's ``malloc`` serves a large block (a 1.9 MB camera frame,
  a 3.8 MB flow field) from fresh ``mmap`` pages or trims the heap as soon as such blocks are
  freed, so every frame's buffers come back as new pages and the kernel zero-fills them on the
  first touch: about 1 400 page faults, 3 ms, for rclpy to take one 1.9 MB serialized frame
  from the middleware on an idle 2-core AMD EPYC, 0.36 ms and no fault once malloc keeps such
  blocks in its heap. ``LANE_SEG_MALLOC_KEEP_MB`` sets the block size kept (0 leaves glibc's
  defaults).
* :func:`set_opencv_threads`: OpenCV runs a resize or colour conversion on a pool of one
  thread per core, and the pool's threads spin (``sched_yield``) between jobs. Two nodes on
  2 cores each kept a spinning OpenCV thread: 40 000 context switches a second per node in a
  soak, CPU taken from the other node and the camera. The nodes run OpenCV in the calling
  thread (1); ``LANE_SEG_OPENCV_THREADS`` overrides it (0: OpenCV's default).
* :func:`lower_thread_priority`: per-thread niceness, for the ``worker_nice`` parameter.

And :func:`pin_process` / :func:`pin_thread` for the nodes' ``cpu_affinity`` parameter: on 2
cores, one core per node cut the per-frame wait p95 from 5.7-6.8 to 3.7-4.7 ms in interleaved
soaks.
"""

import ctypes
import os
import platform
import sys
import threading

GIL_SWITCH_ENV = 'LANE_SEG_GIL_SWITCH_MS'
GIL_SWITCH_DEFAULT_MS = 1.0
GIL_SWITCH_RANGE_MS = (0.05, 100.0)

OPENCV_THREADS_ENV = 'LANE_SEG_OPENCV_THREADS'
OPENCV_THREADS_DEFAULT = 1
OPENCV_THREADS_MAX = 256

MALLOC_KEEP_ENV = 'LANE_SEG_MALLOC_KEEP_MB'
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MALLOC_KEEP_MAX_MB = 32
MALLOC_KEEP_DEFAULT_MB = 8
# mallopt() parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _env_number(environ, name, default, low, high, unit, symbol, warn):
    """Return the number in ``environ[name]`` if it lies in [low, high], else ``default``."""
    text = environ.get(name, '').strip()
    if not text:
        return default
    try:
        asked = float(text)
    except ValueError:
        asked = None
    if asked is not None and low <= asked <= high:
        return asked
    if warn is not None:
        warn(f'{name}={text!r} is not a number of {unit} in [{low:g}, {high:g}]; using '
             f'{default:g} {symbol}')
    return default


def set_gil_switch_interval(environ=None, warn=None) -> float:
    """
    Set the interpreter's thread switch interval for a node process; return it in ms.

    ``LANE_SEG_GIL_SWITCH_MS`` overrides the default (1 ms); a value that is not a number in
    [0.05, 100] is refused with a warning through ``warn(text)`` and the default is used.
    """
    environ = os.environ if environ is None else environ
    low, high = GIL_SWITCH_RANGE_MS
    value = _env_number(environ, GIL_SWITCH_ENV, GIL_SWITCH_DEFAULT_MS, low, high,
                        'milliseconds', 'ms', warn)
    sys.setswitchinterval(value / 1000.0)
    return value


def set_opencv_threads(environ=None, warn=None, cv2=None):
    """
    Set OpenCV's thread count for a node process; return it (``None``: OpenCV's default).

    ``LANE_SEG_OPENCV_THREADS`` overrides the default (1: everything in the calling thread);
    0 leaves OpenCV's own default; a value that is not a whole number in [0, 256] is refused
    with a warning through ``warn(text)`` and the default is used.
    """
    environ = os.environ if environ is None else environ
    count = _env_number(environ, OPENCV_THREADS_ENV, OPENCV_THREADS_DEFAULT, 0,
                        OPENCV_THREADS_MAX, 'threads', 'thread(s)', warn)
    if count != int(count):
        if warn is not None:
            warn(f'{OPENCV_THREADS_ENV}={count:g} is not a whole number of threads; using '
                 f'{OPENCV_THREADS_DEFAULT}')
        count = OPENCV_THREADS_DEFAULT
    if count == 0:
        return None
    if cv2 is None:
        import cv2
    cv2.setNumThreads(int(count))
    return int(count)


def _glibc():
    """Return the process's C library if it is glibc (it has ``mallopt``), else ``None``."""
    if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_large_buffers(environ=None, warn=None, libc=None):
    """
    Make glibc's ``malloc`` reuse freed blocks of up to N MiB instead of returning them.

    N is ``LANE_SEG_MALLOC_KEEP_MB`` (default 8; at most 32, the most glibc accepts; 0 leaves
    the C library's defaults; 32 let the nodes' memory grow by 72 MiB in 10 minutes). Blocks
    up to N MiB are then served from the heap (mmap threshold N MiB) and the heap keeps up to
    2N MiB free at its top (trim threshold), so a node's per-frame buffers reuse pages that
    are already mapped. The cost is more resident memory, bounded per malloc arena. Returns N
    when set, ``None`` where it is not (not glibc, 0, or ``mallopt`` refused: said through
    ``warn``). A value that is not a number in [0, 32] is refused with a warning and the
    default is used.
    """
    environ = os.environ if environ is None else environ
    size_mb = _env_number(environ, MALLOC_KEEP_ENV, MALLOC_KEEP_DEFAULT_MB, 0,
                          MALLOC_KEEP_MAX_MB, 'MiB', 'MiB', warn)
    if size_mb == 0:
        return None
    libc = _glibc() if libc is None else libc
    if libc is None:
        return None
    size = int(size_mb * 1024 * 1024)
    for name, param, value in (('mmap threshold', M_MMAP_THRESHOLD, size),
                               ('trim threshold', M_TRIM_THRESHOLD, 2 * size)):
        if not libc.mallopt(param, value):
            if warn is not None:
                warn(f'mallopt refused a {name} of {value / 2 ** 20:g} MiB; large buffers may '
                     f'be mapped afresh for every frame')
            return None
    return size_mb


def tune_process(warn=None) -> dict:
    """Apply the GIL switch interval, the malloc and the OpenCV settings; return them."""
    return {'gil_switch_ms': set_gil_switch_interval(warn=warn),
            'malloc_keep_mb': keep_large_buffers(warn=warn),
            'opencv_threads': set_opencv_threads(warn=warn)}


def lower_thread_priority(increment: int) -> int:
    """
    Add ``increment`` to the calling thread's niceness (Linux: niceness is per thread).

    Returns the thread's new niceness. Raising one's niceness needs no privilege; threads the
    caller starts afterwards inherit it. Raises ``OSError`` where threads have no niceness of
    their own (not Linux).
    """
    if not sys.platform.startswith('linux'):
        raise OSError(f'per-thread niceness is a Linux feature, not available on '
                      f'{sys.platform}')
    tid = threading.get_native_id()
    nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(increment))
    os.setpriority(os.PRIO_PROCESS, tid, nice)
    return os.getpriority(os.PRIO_PROCESS, tid)


def parse_cpu_list(text: str) -> frozenset:
    """
    Parse a CPU list as ``taskset -c`` takes it (``'0'``, ``'0,2'``, ``'0-3'``); '' is empty.

    Raises ``ValueError`` naming what is wrong: not a list of CPU numbers and ranges, or CPUs
    this process may not run on (``os.sched_getaffinity``).
    """
    text = str(text).strip()
    if not text:
        return frozenset()
    cpus = set()
    for part in text.split(','):
        part = part.strip()
        low, dash, high = part.partition('-')
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f'{text!r} is not a CPU list such as 0 or 0,2 or 0-3') from None
        if first < 0 or last < first:
            raise ValueError(f'{part!r} in {text!r} is not a CPU number or a rising range')
        cpus.update(range(first, last + 1))
    allowed = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    if allowed is not None and not cpus <= allowed:
        raise ValueError(f'CPU(s) {sorted(cpus - allowed)} not available to this process '
                         f'(allowed: {sorted(allowed)})')
    return frozenset(cpus)


def _check_affinity_support():
    if not sys.platform.startswith('linux') or not hasattr(os, 'sched_setaffinity'):
        raise OSError(f'CPU affinity per thread is a Linux feature, not available on '
                      f'{sys.platform}')


def pin_thread(cpus) -> int:
    """
    Set the CPU affinity of the calling thread only (Linux: affinity is per thread).

    Returns the thread's native id. Threads it starts afterwards inherit it; the process's
    other threads keep theirs. Raises ``OSError`` where affinity cannot be set (not Linux).
    """
    _check_affinity_support()
    os.sched_setaffinity(0, set(cpus))   # 0: the calling thread, not the whole process
    return threading.get_native_id()


def pin_process(cpus, pid='self') -> list:
    """
    Set the CPU affinity of every thread of a process (this one by default) to ``cpus``.

    Returns the thread ids. Threads started afterwards inherit it. Raises ``OSError`` where
    affinity cannot be set (not Linux).
    """
    _check_affinity_support()
    tids = sorted(int(t) for t in os.listdir(f'/proc/{pid}/task'))
    for tid in tids:
        try:
            os.sched_setaffinity(tid, set(cpus))
        except ProcessLookupError:   # a thread that ended meanwhile
            pass
    return tids
