#!/usr/bin/env python3
"""
Soak test of the node pipeline against issue 6's system targets.

Starts ``camera_sim_node`` (800x600 ``bgra8``, 30 Hz, a short pre-rendered loop so that
rendering happens once up front), ``lane_seg_node`` and ``flow_node`` (int8 models, ONNX
Runtime) as separate processes from the console scripts in the virtual environment, listens to
``/diagnostics`` and both nodes' outputs from its own rclpy node for DURATION seconds, samples
every process's RSS, then stops the processes (SIGINT, then SIGTERM) and writes
``docs/bench/node_soak.json``, ``docs/bench/node_soak.md`` and ``docs/bench/node_soak.png``.

Targets (issue 6): no growing backlog; end-to-end p95 within the node's own processing time
plus 5 ms, in three readings (against the sum of the stage p50s, against the p95 of each
frame's processing, and per frame: the p95 of the wait before processing); the whole system's
RSS stable over the run.

    .venv/bin/python docs/scripts/node_soak.py [--duration 600] [--threads 1]
"""

import argparse
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import time

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
CAMERA_TOPIC = '/carla/ego_vehicle/rgb_front/image'
NODES = ('lane_seg_node', 'flow_node')
OUTPUTS = {'lane_seg_node': '/lane_seg_node/mask', 'flow_node': '/flow_node/flow'}
MODELS = {'lane_seg_node': 'models/lane_unet_int8_ort.onnx',
          'flow_node': 'models/flow_int8_ort.onnx'}
STAGES = ('conversion', 'preprocess', 'inference', 'postprocess', 'publish')
WAITS = ('transport', 'queue', 'total', 'publisher', 'middleware', 'executor')
MARGIN_MS = 5.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--duration', type=float, default=600.0,
                        help='seconds measured after the warm-up (default 600)')
    parser.add_argument('--warmup', type=float, default=15.0,
                        help='seconds after both nodes run at the camera rate (default 15)')
    parser.add_argument('--qos', choices=['best_effort', 'reliable'], default='best_effort',
                        help='reliability of the camera subscriptions of both nodes '
                        '(default best_effort, as the nodes default to)')
    parser.add_argument('--fastdds-transports', metavar='VALUE', default=None,
                        help='FASTDDS_BUILTIN_TRANSPORTS for every process, e.g. LARGE_DATA '
                        '(Fast DDS: UDP for discovery, SHM/TCP for data); default: unset')
    parser.add_argument('--fastdds-profile', metavar='XML', default=None,
                        help='FASTDDS_DEFAULT_PROFILES_FILE for every process, e.g. '
                        'config/fastdds_large_images.xml; default: unset')
    parser.add_argument('--threads', type=int, default=1,
                        help='engine threads per node (default 1: 3 processes share 2 cores)')
    parser.add_argument('--rate', type=float, default=30.0, help='camera rate (Hz)')
    parser.add_argument('--loop-frames', type=int, default=30)
    parser.add_argument('--rss-period', type=float, default=10.0)
    parser.add_argument('--listener-nice', type=int, default=0, metavar='N',
                        help="niceness added to the soak's own listener process after it has "
                        'started the nodes (they keep 0): its output subscriptions (a 3.8 MB '
                        'flow image per frame) compete with the nodes for the 2 cores '
                        '(default 0)')
    parser.add_argument('--listener-settings', action='store_true',
                        help="apply the node processes' settings (lane_seg.process_tuning: "
                        'malloc, GIL switch interval, OpenCV threads) to the listener too '
                        '(default: off, the listener as in the runs before 2026-12-07)')
    parser.add_argument('--pin-nodes', action='store_true',
                        help='pin every thread of lane_seg_node to CPU 0 and of flow_node to '
                        'CPU 1 once they run (the camera and the listener stay unpinned)')
    parser.add_argument('--cpu-affinity', action='store_true',
                        help="start lane_seg_node with its cpu_affinity parameter '0' and "
                        "flow_node with '1' (the nodes pin themselves, as a deployment "
                        'would; the camera and the listener stay unpinned; CPUs 0 and 1 '
                        'must be allowed to this process)')
    parser.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                        help='a parameter for both perception nodes, as -p takes it '
                        '(repeatable)')
    parser.add_argument('--worker-nice', type=int, default=None, metavar='N',
                        help="the nodes' worker_nice parameter (niceness of their worker "
                        "threads); default: the nodes' own (0)")
    parser.add_argument('--domain-id', type=int, default=73,
                        help='ROS_DOMAIN_ID of the soak, away from other runs on the machine')
    parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'bench'))
    parser.add_argument('--name', default='node_soak')
    parser.add_argument('--reanalyse', metavar='JSON',
                        help='only redo the analysis, summary and plot from a saved JSON')
    args = parser.parse_args(argv)
    if args.pin_nodes and args.cpu_affinity:
        parser.error('--pin-nodes and --cpu-affinity are two ways of pinning the same nodes: '
                     'give one')
    return args


def node_commands(args):
    remap = ['-r', f'image:={CAMERA_TOPIC}']
    camera = [os.path.join(BIN, 'camera_sim_node'), '--ros-args',
              '-p', 'width:=800', '-p', 'height:=600', '-p', f'rate_hz:={float(args.rate)!r}',
              '-p', f'loop_frames:={args.loop_frames}', '-p', 'publish_ground_truth:=false']
    cmds = {'camera_sim_node': camera}
    for node in NODES:
        cmds[node] = [os.path.join(BIN, node), '--ros-args', '-p', 'backend:=onnxruntime',
                      '-p', f'model_path:={os.path.join(ROOT, MODELS[node])}',
                      '-p', f'threads:={args.threads}',
                      '-p', f'qos_reliability:={args.qos}'] + remap
        if args.worker_nice is not None:
            cmds[node] += ['-p', f'worker_nice:={args.worker_nice}']
        for param in args.node_param:
            cmds[node] += ['-p', param]
        if args.cpu_affinity:   # quoted: a string parameter, not the integer 0
            cmds[node] += ['-p', f"cpu_affinity:='{NODES.index(node)}'"]
    return cmds


def thread_cpus(pid) -> dict:
    """Return {CPU list: number of threads} over the threads of a process (Linux /proc)."""
    counts = {}
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return counts
    for tid in tids:
        try:
            with open(f'/proc/{pid}/task/{tid}/status') as f:
                line = next(x for x in f if x.startswith('Cpus_allowed_list:'))
        except (OSError, StopIteration):
            continue
        cpus = line.split(':', 1)[1].strip()
        counts[cpus] = counts.get(cpus, 0) + 1
    return counts


def cpu_seconds(pid):
    """User plus system CPU time of a process in seconds from /proc (None if gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid):
    """Resident set size of a process in MiB from /proc (psutil is not installed)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def machine_info():
    model = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open('/proc/meminfo') as f:
            mem_gb = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    return {'cpu': model, 'cpus_usable': affinity, 'cpus_total': os.cpu_count(),
            'memory_gib': mem_gb, 'platform': platform.platform(),
            'python': platform.python_version()}


def header_stamp_ns(raw: bytes):
    """Header stamp of a serialized (CDR) message that starts with a std_msgs/Header."""
    if len(raw) < 12:
        return None
    endian = '<' if raw[1] & 1 else '>'
    sec, nsec = struct.unpack_from(endian + 'iI', raw, 4)
    return sec * 1_000_000_000 + nsec


def to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float('nan')


class Listener:
    """The soak's own node: diagnostics and output ages (raw messages, no deserialization)."""

    def __init__(self):
        self.node = rclpy.create_node('node_soak')
        self.latest = {}  # node name -> dict of diagnostic values
        self.ages = {n: [] for n in NODES}  # (receive monotonic s, age ms)
        self.recording = False
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                         reliability=ReliabilityPolicy.RELIABLE)
        for node, topic in OUTPUTS.items():
            self.node.create_subscription(Image, topic, self._age_cb(node), qos, raw=True)

    def _on_diag(self, msg):
        for status in msg.status:
            name = status.hardware_id.split('/')[-1]
            if name in NODES:
                values = {kv.key: kv.value for kv in status.values}
                values['_level'] = int.from_bytes(status.level, 'little') \
                    if isinstance(status.level, bytes) else int(status.level)
                values['_message'] = status.message
                self.latest[name] = values

    def _age_cb(self, node):
        def callback(raw):
            now_ns = time.time_ns()
            stamp = header_stamp_ns(raw)
            if stamp is not None and self.recording:
                self.ages[node].append((time.monotonic(), (now_ns - stamp) / 1e6))
        return callback


def diag_sample(values):
    stage_p50 = {s: to_float(values.get(f'{s}_ms.p50')) for s in STAGES}
    return {
        'e2e_p50_ms': to_float(values.get('end_to_end_ms.p50')),
        'e2e_p95_ms': to_float(values.get('end_to_end_ms.p95')),
        'e2e_p99_ms': to_float(values.get('end_to_end_ms.p99')),
        'e2e_max_ms': to_float(values.get('end_to_end_ms.max')),
        'stage_p50_ms': stage_p50,
        'wait_ms': {w: {q: to_float(values.get(f'{w}_wait_ms.{q}')) for q in ('p50', 'p95')}
                    for w in WAITS},
        'processing_ms': sum(v for v in stage_p50.values() if v == v),
        'processing_p95_ms': to_float(values.get('processing_ms.p95')),
        'input_rate_hz': to_float(values.get('input_rate_hz')),
        'output_rate_hz': to_float(values.get('output_rate_hz')),
        'frames_received': int(to_float(values.get('frames_received', 0)) or 0),
        'frames_processed': int(to_float(values.get('frames_processed', 0)) or 0),
        'frames_dropped': int(to_float(values.get('frames_dropped', 0)) or 0),
        'frames_lost': int(to_float(values.get('frames_lost', 0)) or 0),
        'frames_rejected': int(to_float(values.get('frames_rejected', 0)) or 0),
        'level': values.get('_level'),
        'message': values.get('_message'),
    }


def stop(procs, timeout_s=10.0):
    codes = {}
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            codes[name] = {'returncode': proc.returncode, 'how': 'SIGINT'}
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
                codes[name] = {'returncode': proc.returncode, 'how': 'SIGTERM'}
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = {'returncode': proc.returncode, 'how': 'SIGKILL'}
    return codes


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float('nan')


def pct(values, q):
    values = sorted(v for v in values if v == v)
    if not values:
        return float('nan')
    return values[min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))]


def analyse(samples, ages, rss, t_end):
    """Per-node summary and the three targets."""
    result = {'nodes': {}, 'targets': {}}
    latency_ok = True
    backlog_ok = True
    wait_ok = True
    own_ok = True
    for node in NODES:
        rows = [s[node] for s in samples if node in s]
        # the node's statistics window is 10 s: every 10th 1 Hz sample is independent
        windows = rows[::10]
        within = [r['e2e_p95_ms'] <= r['processing_ms'] + MARGIN_MS for r in windows]
        waits = {w: {q: median(r['wait_ms'][w][q] for r in windows if 'wait_ms' in r)
                     for q in ('p50', 'p95')} for w in WAITS}
        first = [a for t, a in ages[node] if t < 60.0]
        last = [a for t, a in ages[node] if t >= t_end - 60.0]
        last_row = rows[-1] if rows else {}
        first_row = rows[0] if rows else {}
        e2e_p95 = median(r['e2e_p95_ms'] for r in windows)
        processing = median(r['processing_ms'] for r in windows)
        processing_p95 = median(r.get('processing_p95_ms', float('nan')) for r in windows)
        received = last_row.get('frames_received', 0) - first_row.get('frames_received', 0)
        dropped = last_row.get('frames_dropped', 0) - first_row.get('frames_dropped', 0)
        lost = last_row.get('frames_lost', 0) - first_row.get('frames_lost', 0)
        summary = {
            'e2e_p50_ms_median': median(r['e2e_p50_ms'] for r in windows),
            'e2e_p95_ms_median': e2e_p95,
            'e2e_p95_ms_max_window': max((r['e2e_p95_ms'] for r in windows), default=None),
            'processing_ms_median': processing,
            'processing_p95_ms_median': processing_p95,
            'stage_p50_ms_median': {s: median(r['stage_p50_ms'][s] for r in windows)
                                    for s in STAGES},
            'input_rate_hz_median': median(r['input_rate_hz'] for r in windows),
            'output_rate_hz_median': median(r['output_rate_hz'] for r in windows),
            'frames_received': received,
            'frames_dropped': dropped,
            'dropped_fraction': dropped / received if received else None,
            'frames_lost': lost,
            'frames_rejected': last_row.get('frames_rejected', 0)
            - first_row.get('frames_rejected', 0),
            'wait_ms_median': waits,
            'windows': len(windows),
            'windows_within_target': sum(within),
            'output_age_ms': {
                'count': len(ages[node]),
                'p50': median(a for _, a in ages[node]),
                'p95': pct([a for _, a in ages[node]], 95),
                'max': max((a for _, a in ages[node]), default=None),
                'first_minute_p50': median(first), 'first_minute_p95': pct(first, 95),
                'last_minute_p50': median(last), 'last_minute_p95': pct(last, 95),
            },
        }
        age = summary['output_age_ms']
        growth = age['last_minute_p50'] - age['first_minute_p50']
        age['growth_p50_ms'] = growth
        node_backlog_ok = growth == growth and growth <= 5.0
        node_latency_ok = e2e_p95 == e2e_p95 and e2e_p95 <= processing + MARGIN_MS
        wait_p95 = waits['total']['p95']
        node_wait_ok = wait_p95 == wait_p95 and wait_p95 <= MARGIN_MS
        summary['backlog_ok'] = node_backlog_ok
        summary['latency_ok'] = node_latency_ok
        summary['wait_ok'] = node_wait_ok
        node_own_ok = processing_p95 == processing_p95 and e2e_p95 <= processing_p95 + MARGIN_MS
        summary['own_processing_ok'] = node_own_ok
        own_ok &= node_own_ok
        wait_ok &= node_wait_ok
        backlog_ok &= node_backlog_ok
        latency_ok &= node_latency_ok
        result['nodes'][node] = summary
    rss_summary = {}
    totals = [sum(v for v in r['rss_mb'].values() if v is not None) for r in rss]
    for name in (rss[0]['rss_mb'] if rss else {}):
        series = [r['rss_mb'].get(name) for r in rss if r['rss_mb'].get(name) is not None]
        if series:
            rss_summary[name] = {'first': series[0], 'last': series[-1], 'max': max(series)}
    total_first = median(totals[:6])  # first minute
    total_last = median(totals[-6:])  # last minute
    growth = total_last - total_first
    limit = max(5.0, 0.02 * total_first) if total_first == total_first else float('nan')
    rss_summary['system'] = {'first': totals[0] if totals else None,
                             'last': totals[-1] if totals else None,
                             'max': max(totals) if totals else None,
                             'first_minute_median': total_first,
                             'last_minute_median': total_last, 'growth_mb': growth,
                             'allowed_growth_mb': limit}
    result['rss'] = rss_summary
    result['targets'] = {
        'no_growing_backlog': {
            'met': bool(backlog_ok),
            'rule': 'output message age (receive time - header stamp) p50 in the last minute '
                    'at most 5 ms above the first minute, for both nodes'},
        'e2e_p95_within_processing_plus_5ms': {
            'met': bool(latency_ok),
            'rule': 'median over 10 s windows of the end-to-end p95 <= median of the sum of '
                    'stage p50s + 5 ms, for both nodes'},
        'e2e_p95_within_processing_p95_plus_5ms': {
            'met': bool(own_ok),
            'rule': 'the same target against the p95 of the processing: median over 10 s '
                    "windows of the end-to-end p95 <= median of the p95 of each frame's own "
                    'processing time (the sum of its stages) + 5 ms, for both nodes'},
        'per_frame_wait_p95_within_5ms': {
            'met': bool(wait_ok),
            'rule': 'the same target read per frame: median over 10 s windows of the p95 of '
                    '(end-to-end - processing) of each frame, i.e. stamp to callback '
                    '(transport) plus callback to processing (queue), <= 5 ms, for both nodes'},
        'rss_stable': {
            'met': bool(growth == growth and growth <= limit),
            'rule': 'whole-system RSS (sum of the three node processes) median of the last '
                    'minute at most max(5 MiB, 2 %) above the first minute'},
    }
    return result


def fmt(value, digits=1):
    if value is None or value != value:
        return 'n/a'
    return f'{value:.{digits}f}'


def write_markdown(path, report):
    res = report['result']
    lines = ['# Node soak: camera_sim_node + lane_seg_node + flow_node', '',
             'Issue 6 targets, measured by `docs/scripts/node_soak.py` (separate processes, '
             'console scripts from `.venv/bin`, ONNX Runtime, int8 models).', '',
             '## Machine', '']
    for key, value in report['machine'].items():
        lines.append(f'- {key}: {value}')
    lines += ['', '## Command', '', '```bash', report['command'], '```', '',
              'Node processes:', '', '```bash']
    lines += [' '.join(cmd) for cmd in report['node_commands'].values()]
    lines += ['```', '',
              f'Measured for {fmt(report["measured_s"], 0)} s after '
              f'{fmt(report["warmup_s"], 0)} s of start-up and warm-up; camera at '
              f'{report["args"]["rate"]:g} Hz, 800x600 `bgra8`, {report["args"]["loop_frames"]} '
              f'pre-rendered frames looped; engine threads {report["args"]["threads"]} per node; '
              'overlay and flow_vis on (the defaults); Fast DDS builtin transports: '
              + (f'`FASTDDS_BUILTIN_TRANSPORTS={report["args"]["fastdds_transports"]}`'
                 if report['args'].get('fastdds_transports') else
                 f'the profile `{report["args"]["fastdds_profile"]}`'
                 if report['args'].get('fastdds_profile') else 'the default (UDP + SHM)')
              + '.', '', '## Targets', '',
              '| target | rule | measured | met |', '|---|---|---|---|']
    t = res['targets']
    n = res['nodes']
    backlog = '; '.join(
        f'{k}: age p50 {fmt(v["output_age_ms"]["first_minute_p50"])} -> '
        f'{fmt(v["output_age_ms"]["last_minute_p50"])} ms' for k, v in n.items())
    latency = '; '.join(
        f'{k}: p95 {fmt(v["e2e_p95_ms_median"])} ms vs {fmt(v["processing_ms_median"])} + 5 '
        f'ms ({v["windows_within_target"]}/{v["windows"]} windows within)'
        for k, v in n.items())
    s = res['rss']['system']
    rss = (f'{fmt(s["first_minute_median"])} -> {fmt(s["last_minute_median"])} MiB '
           f'(growth {fmt(s["growth_mb"])}, allowed {fmt(s["allowed_growth_mb"])})')
    own = '; '.join(
        f'{k}: p95 {fmt(v["e2e_p95_ms_median"])} ms vs processing p95 '
        f'{fmt(v.get("processing_p95_ms_median"))} + 5 ms' for k, v in n.items())
    wait = '; '.join(
        f'{k}: p95 {fmt(v["wait_ms_median"]["total"]["p95"])} ms (transport p95 '
        f'{fmt(v["wait_ms_median"]["transport"]["p95"])}, queue p95 '
        f'{fmt(v["wait_ms_median"]["queue"]["p95"])})'
        for k, v in n.items() if 'wait_ms_median' in v)
    for key, measured in (('no_growing_backlog', backlog),
                          ('e2e_p95_within_processing_plus_5ms', latency),
                          ('e2e_p95_within_processing_p95_plus_5ms', own),
                          ('per_frame_wait_p95_within_5ms', wait),
                          ('rss_stable', rss)):
        if key not in t:   # a report written before the target existed
            continue
        lines.append(f'| {key} | {t[key]["rule"]} | {measured} | '
                     f'{"met" if t[key]["met"] else "NOT met"} |')
    lines += ['', '## Per node (medians over 10 s windows)', '',
              '| node | e2e p50 | e2e p95 | processing (sum of stage p50s) | processing p95 (per '
              'frame) | conversion | '
              'preprocess | inference | postprocess | publish | in Hz | out Hz | received | '
              'dropped | lost | rejected | output age p50 / p95 / max | transport p50 / p95 | '
              'queue p50 / p95 | publisher p50 / p95 | middleware p50 / p95 | '
              'executor p50 / p95 |',
              '|---|' + '---|' * 21]
    for k, v in n.items():
        st = v['stage_p50_ms_median']
        a = v['output_age_ms']
        lines.append(
            f'| {k} | {fmt(v["e2e_p50_ms_median"])} | {fmt(v["e2e_p95_ms_median"])} | '
            f'{fmt(v["processing_ms_median"])} | {fmt(v.get("processing_p95_ms_median"))} | '
            + ' | '.join(fmt(st[x], 2) for x in STAGES)
            + f' | {fmt(v["input_rate_hz_median"])} | {fmt(v["output_rate_hz_median"])} | '
            f'{v["frames_received"]} | {v["frames_dropped"]} '
            f'({fmt(100 * (v["dropped_fraction"] or 0))} %) | {v.get("frames_lost", "n/a")} | '
            f'{v["frames_rejected"]} | {fmt(a["p50"])} / {fmt(a["p95"])} / {fmt(a["max"])} | '
            + ' | '.join(f'{fmt(w.get("p50"))} / {fmt(w.get("p95"))}' for w in (
                v.get('wait_ms_median', {}).get(name, {})
                for name in ('transport', 'queue', 'publisher', 'middleware', 'executor')))
            + ' |')
    lines += ['', 'Times in ms. Output age: receive time in the soak script node minus the '
              'output header stamp (the camera stamp), so end-to-end plus transport. Transport: '
              "header stamp to the node's subscription callback, or with the nodes' "
              "`receive: worker` (the default on Kilted) to the worker's take of the frame, "
              'which then includes waiting for the previous frame (camera publish, '
              'middleware, executor or worker wake-up); queue: callback to the start of '
              'processing (the worker busy with the previous frame; near 0 with `receive: '
              "worker`). Transport in parts, from the middleware's timestamps: publisher "
              "(header stamp to the camera's DDS write), middleware (write to reception by "
              "the node's DDS reader), executor (reception to the callback or the take). "
              'Lost: frames the camera wrote that never reached the node (gaps in the '
              "writer's sequence numbers).", '',
              '## RSS (MiB, sampled every '
              f'{report["args"]["rss_period"]:g} s)', '',
              '| process | first | last | max |', '|---|---|---|---|']
    for name, v in res['rss'].items():
        lines.append(f'| {name} | {fmt(v["first"])} | {fmt(v["last"])} | {fmt(v["max"])} |')
    if report.get('cpu_percent_of_a_core'):
        lines += ['', 'CPU over the measured time, % of one core (2 cores = 200 %): ' + ', '.join(
            f'{k} {fmt(v)}' for k, v in report['cpu_percent_of_a_core'].items()) + '.']
    if report.get('threads_per_cpu_list'):
        lines += ['', 'Threads per allowed CPU list after the warm-up (/proc): ' + '; '.join(
            f'{k}: ' + ', '.join(f'{n} on {c}' for c, n in v.items())
            for k, v in report['threads_per_cpu_list'].items()) + '.']
    lines += ['', f'![RSS and end-to-end p95 over time]({report["name"]}.png)', '',
              'Exit of the node processes: ' + ', '.join(
                  f'{k} {v["returncode"]} ({v["how"]})' for k, v in report['exit'].items()),
              '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def plot(path, report):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    rss = report['rss_samples']
    t0 = report['t0']
    for name in NODES + ('camera_sim_node',):
        ax1.plot([r['t'] - t0 for r in rss], [r['rss_mb'].get(name) for r in rss], label=name)
    ax1.plot([r['t'] - t0 for r in rss],
             [sum(v for v in r['rss_mb'].values() if v is not None) for r in rss],
             label='system (sum)', color='k')
    ax1.set_ylabel('RSS (MiB)')
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for node in NODES:
        rows = [(s['t'] - t0, s[node]) for s in report['diag_samples'] if node in s]
        ax2.plot([t for t, _ in rows], [r['e2e_p95_ms'] for _, r in rows],
                 label=f'{node} e2e p95')
        ax2.plot([t for t, _ in rows], [r['processing_ms'] + MARGIN_MS for _, r in rows],
                 linestyle='--', label=f'{node} processing + 5 ms')
    ax2.set_ylabel('ms (10 s rolling window)')
    ax2.set_xlabel('time since measurement start (s)')
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle('node soak: 30 Hz 800x600 bgra8, lane_seg_node + flow_node (int8, ORT)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.reanalyse:
        with open(args.reanalyse) as f:
            report = json.load(f)
        return finish(report, os.path.splitext(args.reanalyse)[0])
    os.environ['ROS_DOMAIN_ID'] = str(args.domain_id)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if args.fastdds_transports:   # before rclpy.init: the listener uses the same transports
        os.environ['FASTDDS_BUILTIN_TRANSPORTS'] = args.fastdds_transports
    if args.fastdds_profile:
        os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = os.path.abspath(args.fastdds_profile)
    os.makedirs(args.out, exist_ok=True)
    cmds = node_commands(args)
    logs = {name: open(os.path.join(args.out, f'.{args.name}_{name}.log'), 'w')
            for name in cmds}
    t_start = time.monotonic()
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=logs[name],
                                    stderr=subprocess.STDOUT, env=os.environ.copy())
             for name, cmd in cmds.items()}
    if args.listener_nice:
        os.nice(args.listener_nice)
    if args.listener_settings:
        from lane_seg.process_tuning import tune_process
        print('listener process settings:', tune_process(warn=print), flush=True)
    rclpy.init(args=[])
    listener = Listener()
    executor = SingleThreadedExecutor()
    executor.add_node(listener.node)
    diag_samples, rss_samples = [], []
    exit_codes = {}
    try:
        # warm-up: both nodes processing at the camera rate, then args.warmup more seconds
        ready_at = None
        while True:
            executor.spin_once(timeout_sec=0.1)
            now = time.monotonic()
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f'{name} exited with {proc.returncode} during warm-up')
            if ready_at is None and all(
                    to_float(listener.latest.get(n, {}).get('input_rate_hz')) >= 0.8 * args.rate
                    for n in NODES):
                ready_at = now
                print(f'nodes at rate after {now - t_start:.1f} s', flush=True)
                if args.pin_nodes:
                    from lane_seg.process_tuning import pin_process
                    for cpu, name in enumerate(NODES):
                        pin_process({cpu}, procs[name].pid)
                    print('pinned: ' + ', '.join(f'{n} to CPU {c}' for c, n in enumerate(NODES)),
                          flush=True)
            if ready_at is not None and now - ready_at >= args.warmup:
                break
            if now - t_start > 120.0:
                print('warning: camera not at 80 % of its rate after 120 s; '
                      'measuring anyway', flush=True)
                break
        warmup_s = time.monotonic() - t_start
        affinity = {name: thread_cpus(p.pid) for name, p in procs.items()}
        print('threads per CPU list: ' + '; '.join(f'{k} {v}' for k, v in affinity.items()),
              flush=True)
        listener.recording = True
        t0 = time.monotonic()
        pids = dict({name: p.pid for name, p in procs.items()}, node_soak_listener=os.getpid())
        cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        next_diag = t0
        next_rss = t0
        last_print = t0
        while True:
            executor.spin_once(timeout_sec=0.05)
            now = time.monotonic()
            if now - t0 >= args.duration:
                break
            if now >= next_diag:
                next_diag += 1.0
                row = {'t': now}
                for n in NODES:
                    if n in listener.latest:
                        row[n] = diag_sample(listener.latest[n])
                diag_samples.append(row)
            if now >= next_rss:
                next_rss += args.rss_period
                rss_samples.append({'t': now, 'rss_mb': {name: rss_mb(p.pid)
                                                         for name, p in procs.items()},
                                    'soak_script_rss_mb': rss_mb(os.getpid())})
            if now - last_print >= 60.0:
                last_print = now
                row = diag_samples[-1]
                print(f'{now - t0:5.0f} s: ' + '; '.join(
                    f'{n} p95 {fmt(row[n]["e2e_p95_ms"])} ms proc {fmt(row[n]["processing_ms"])} '
                    f'ms out {fmt(row[n]["output_rate_hz"])} Hz drop {row[n]["frames_dropped"]}'
                    for n in NODES if n in row)
                    + f'; rss {fmt(sum(v or 0 for v in rss_samples[-1]["rss_mb"].values()))} MiB',
                    flush=True)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f'{name} exited with {proc.returncode}')
        t_end = time.monotonic()
        cpu_end = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu_percent = {name: None if cpu_start[name] is None or cpu_end[name] is None else
                       round(100.0 * (cpu_end[name] - cpu_start[name]) / (t_end - t0), 1)
                       for name in pids}
        print('CPU % of one core over the measurement: ' + ', '.join(
            f'{k} {v}' for k, v in cpu_percent.items()), flush=True)
    finally:
        exit_codes = stop(procs)
        for f in logs.values():
            f.close()
        executor.shutdown()
        listener.node.destroy_node()
        rclpy.try_shutdown()
    ages = {n: [[round(t - t0, 3), round(a, 3)] for t, a in listener.ages[n]] for n in NODES}
    report = {
        'name': args.name,
        'machine': machine_info(),
        # the node process settings (lane_seg.process_tuning) read LANE_SEG_* variables
        'command': ' '.join([f'{k}={v}' for k, v in sorted(os.environ.items())
                             if k.startswith('LANE_SEG_')]
                            + [os.path.relpath(sys.executable, ROOT)]
                            + [os.path.relpath(os.path.abspath(__file__), ROOT)]
                            + (sys.argv[1:] if argv is None else list(argv))),
        'node_commands': {k: [os.path.relpath(v[0], ROOT)] + [
            os.path.relpath(x.split(':=')[1], ROOT).join([x.split(':=')[0] + ':=', ''])
            if x.startswith('model_path:=') else x for x in v[1:]] for k, v in cmds.items()},
        'args': vars(args),
        'warmup_s': warmup_s,
        'measured_s': t_end - t0,
        't0': t0,
        'exit': exit_codes,
        'cpu_percent_of_a_core': cpu_percent,
        'threads_per_cpu_list': affinity,
        'diag_samples': diag_samples,
        'rss_samples': rss_samples,
        'measured_end_s': t_end - t0,
        'output_ages_ms': ages,
    }
    base = os.path.join(args.out, args.name)
    with open(base + '.json', 'w') as f:  # raw data first: re-analyse with --reanalyse
        json.dump(report, f, indent=1, default=str)
    return finish(report, base)


def finish(report, base):
    ages = {n: [tuple(x) for x in report['output_ages_ms'][n]] for n in NODES}
    report['result'] = analyse(report['diag_samples'], ages, report['rss_samples'],
                               report['measured_end_s'])
    with open(base + '.json', 'w') as f:
        json.dump(report, f, indent=1, default=str)
    write_markdown(base + '.md', report)
    plot(base + '.png', report)
    print(json.dumps(report['result']['targets'], indent=1))
    print(f'wrote {base}.json, {base}.md, {base}.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
