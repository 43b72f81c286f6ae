#!/usr/bin/env python3
"""
The middleware's floor: stamp-to-callback latency of camera-sized images between two processes.

One process publishes ``bgra8`` images of each size at ``--rate`` (stamped just before
``publish``, serialized bytes as the nodes and the synthetic camera send them); a second
process subscribes (raw bytes, as the nodes do, or typed messages with ``--typed``) and
records wall clock minus stamp in its callback. No inference, nothing else running: what issue
6's per-frame wait can never go below on that machine. Both processes apply the node
processes' settings (``lane_seg.process_tuning``; ``--untuned`` leaves the interpreter's and C
library's defaults, as before 2026-12-07). Prints a Markdown table, writes JSON.

    .venv/bin/python docs/scripts/transport_latency.py \
        --fastdds-profile config/fastdds_large_images.xml --sizes 64x64 300x400 600x800
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

TOPIC = '/transport_latency/image'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', nargs='+', default=['64x64', '300x400', '600x800'],
                        help='HxW of the bgra8 images (default: 64x64 300x400 600x800)')
    parser.add_argument('--rate', type=float, default=30.0, help='publish rate (Hz)')
    parser.add_argument('--count', type=int, default=300, help='images per size')
    parser.add_argument('--typed', action='store_true',
                        help='subscribe to sensor_msgs/Image messages instead of raw bytes')
    parser.add_argument('--untuned', action='store_true',
                        help="do not apply the node processes' settings (malloc, GIL switch "
                        'interval, OpenCV threads) in the two processes')
    parser.add_argument('--fastdds-profile', metavar='XML',
                        help='FASTDDS_DEFAULT_PROFILES_FILE for both processes')
    parser.add_argument('--domain-id', type=int, default=79)
    parser.add_argument('--out', help='JSON file for the results')
    parser.add_argument('--role', choices=('main', 'pub', 'sub'), default='main',
                        help=argparse.SUPPRESS)
    parser.add_argument('--size', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _node(name, untuned=False):
    if not untuned:
        from lane_seg.process_tuning import tune_process
        tune_process(warn=print)
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    rclpy.init()
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                     reliability=ReliabilityPolicy.RELIABLE)
    return rclpy, rclpy.create_node(name), qos


def publish(args):
    from lane_seg.image_cdr import encode_image
    from sensor_msgs.msg import Image
    rclpy, node, qos = _node('transport_latency_pub', args.untuned)
    pub = node.create_publisher(Image, TOPIC, qos)
    height, width = map(int, args.size.split('x'))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 4), np.uint8)
    deadline = time.monotonic() + 20
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    period = 1.0 / args.rate
    start = time.monotonic()
    for i in range(args.count + 10):     # the first 10 are dropped by the subscriber
        stamp = time.time_ns()
        pub.publish(encode_image(image, 'bgra8', stamp // 10 ** 9, stamp % 10 ** 9, 'camera'))
        time.sleep(max(0.0, start + (i + 1) * period - time.monotonic()))
    time.sleep(0.5)
    node.destroy_node()
    rclpy.try_shutdown()


def subscribe(args):
    from sensor_msgs.msg import Image
    rclpy, node, qos = _node('transport_latency_sub', args.untuned)
    latencies = []

    def on_raw(raw):
        now = time.time_ns()
        sec, nanosec = np.frombuffer(raw, '<u4', 2, 4)
        latencies.append((now - (int(sec) * 10 ** 9 + int(nanosec))) / 1e6)

    def on_msg(msg):
        now = time.time_ns()
        latencies.append((now - (msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec))
                         / 1e6)

    node.create_subscription(Image, TOPIC, on_msg if args.typed else on_raw, qos,
                             raw=not args.typed)
    # One executor for the whole run, as the nodes spin: rclpy.spin_once(node) would add the
    # node to the global executor and rebuild its wait set on every call.
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    deadline = time.monotonic() + 30 + args.count / args.rate
    while len(latencies) < args.count + 10 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    print(json.dumps(latencies[10:]))
    node.destroy_node()
    rclpy.try_shutdown()


def measure(args, size):
    env = dict(os.environ, ROS_DOMAIN_ID=str(args.domain_id),
               ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    if args.fastdds_profile:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = os.path.abspath(args.fastdds_profile)
    common = [sys.executable, __file__, '--size', size, '--rate', str(args.rate),
              '--count', str(args.count)] + (['--typed'] if args.typed else []) + (
                  ['--untuned'] if args.untuned else [])
    sub = subprocess.Popen(common + ['--role', 'sub'], env=env, stdout=subprocess.PIPE,
                           text=True)
    time.sleep(1.0)
    subprocess.run(common + ['--role', 'pub'], env=env, check=True)
    out, _ = sub.communicate(timeout=60)
    return np.asarray(json.loads(out.strip().splitlines()[-1]), float)


def main(argv=None):
    args = parse_args(argv)
    if args.role == 'pub':
        return publish(args)
    if args.role == 'sub':
        return subscribe(args)
    rows = {}
    print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; '
          f'{"typed" if args.typed else "raw"} subscription, '
          f'{"untuned" if args.untuned else "node process settings"}, profile '
          f'{args.fastdds_profile or "(none)"}, {args.rate:g} Hz, {args.count} images per size')
    print('| image | MB | n | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|---|')
    for size in args.sizes:
        lat = measure(args, size)
        height, width = map(int, size.split('x'))
        mb = height * width * 4 / 1e6
        rows[size] = {'mb': mb, 'n': int(lat.size), 'p50': float(np.percentile(lat, 50)),
                      'p95': float(np.percentile(lat, 95)), 'max': float(lat.max())}
        r = rows[size]
        print(f'| {size} bgra8 | {mb:.2f} | {r["n"]} | {r["p50"]:.2f} | {r["p95"]:.2f} | '
              f'{r["max"]:.2f} |', flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'args': {k: v for k, v in vars(args).items() if k not in ('role', 'size')},
                       'machine': platform.platform(), 'results': rows}, f, indent=1)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
