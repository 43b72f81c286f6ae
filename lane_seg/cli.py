"""The ``lane-seg`` command line: thin verbs over the package's pure modules."""

import argparse
import json
import os
from pathlib import Path
import sys


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'size {text!r} is not HxW, e.g. 256x512') from None
    if h < 8 or w < 8 or h > 4096 or w > 4096:
        raise argparse.ArgumentTypeError(f'size {text!r} outside 8x8 .. 4096x4096')
    return h, w


def _cmd_demo(args):
    from .demo import run_demo
    summary = run_demo(args.out, frames=args.frames, seed=args.seed, height=args.size[0],
                       width=args.size[1], video=not args.no_video,
                       progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_sim_export(args):
    from .sim.export import export_drive
    summary = export_drive(args.out, frames=args.frames, seed=args.seed, height=args.size[0],
                           width=args.size[1], start=args.start, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_sim_bench(args):
    from .sim.bench import bench_render
    results = [bench_render(h, w, frames=args.frames, seeds=args.seeds) for h, w in args.size]
    print(json.dumps(results, indent=2))
    return 0


def _cmd_run(args):
    from .ros.runner import run
    summary = run(args.params, duration=args.duration, out=args.out, pictures=args.pictures)
    print(json.dumps(summary, indent=2))
    failed = [name for name in ('lane_seg_node', 'flow_node')
              if summary[name]['startup_failure']]
    return 1 if failed else 0


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'{text} is not a positive number')
    return value


def _cmd_train(args):
    if args.task == 'seg':
        from .train.seg import config_from_args, train
    else:
        from .train.flow import config_from_args, train
    result = train(config_from_args(args), log=lambda m: print(m, flush=True))
    if os.environ.get('RANK', '0') == '0':   # under torchrun, rank 0 alone prints the result
        print(json.dumps(result, indent=2))
    return 0


def _cmd_export(args):
    if args.task == 'trt':
        from .engines.tensorrt_backend import build_engine_cache
        from .resources import shipped_model
        model = args.model or shipped_model('lanes', 'int8', backend='tensorrt')
        path = build_engine_cache(model, precision=args.precision, cache_dir=args.cache_dir,
                                  force=args.force)
        print(json.dumps({'model': str(model), 'engine': str(path)}, indent=2))
        return 0
    if not (args.float and args.int8 and args.name):
        raise ValueError('export seg|flow needs --float, --int8 and --name')
    from .train.package import export_models
    print(json.dumps(export_models(args.float, args.int8, args.out, args.name), indent=2))
    return 0


def _add_export(verbs):
    export = verbs.add_parser('export', help='export checkpoints to ONNX (fp32, int8 QDQ for '
                              'TensorRT, int8 for ONNX Runtime)')
    export.add_argument('task', choices=['seg', 'flow', 'trt'],
                        help='seg/flow: checkpoints to ONNX; trt: build the TensorRT engine '
                        'cache of a model ahead of time (deployment images)')
    export.add_argument('--float', help='float checkpoint (.safetensors)')
    export.add_argument('--int8', help='8-bit PTQ/QAT checkpoint')
    export.add_argument('--out', default='models', help='output folder (default models/)')
    export.add_argument('--name', help='artefact name, e.g. lane_unet')
    export.add_argument('--model', help='trt: the int8 QDQ (or fp32) ONNX model; default: the '
                        'shipped lane model')
    export.add_argument('--precision', choices=['int8', 'fp16'], default=None,
                        help='trt: engine precision (default: from the model metadata)')
    export.add_argument('--cache-dir', default=None, help='trt: engine cache folder')
    export.add_argument('--force', action='store_true', help='trt: rebuild even if cached')
    export.set_defaults(func=_cmd_export)


def _cmd_eval(args):
    from . import evaluate
    if args.task == 'seg':
        kwargs = {'list_file': args.list_file} if args.list_file else {}
        result = evaluate.eval_seg(args.data, fmt=args.format or 'folder', model=args.model,
                                   backend=args.backend, threads=args.threads,
                                   limit=args.limit, **kwargs)
    else:
        result = evaluate.eval_flow(args.data, fmt=args.format or 'folder', model=args.model,
                                    method=args.method, backend=args.backend,
                                    threads=args.threads, limit=args.limit)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _add_eval(verbs):
    from .evaluate import OPENCV_METHODS
    ev = verbs.add_parser('eval', help='accuracy and latency of a model on a data set (JSON)')
    tasks = ev.add_subparsers(dest='task', required=True, metavar='TASK')
    for task, formats in (('seg', ['folder', 'culane', 'tusimple']),
                          ('flow', ['folder', 'kitti'])):
        p = tasks.add_parser(task)
        p.add_argument('--model', default=None,
                       help='a model path (ONNX or checkpoint) or a shipped name: int8, fp32, '
                       'mixed (learned per-layer widths) (default: the shipped int8 '
                       'model)')
        if task == 'flow':
            p.add_argument('--method', choices=OPENCV_METHODS, default=None,
                           help='evaluate an OpenCV method instead of a model')
        else:
            p.add_argument('--list-file', default=None, help='CULane list file')
        p.add_argument('--data', required=True, help='data set folder')
        p.add_argument('--format', choices=formats, default=None)
        p.add_argument('--backend', default='auto')
        p.add_argument('--threads', type=int, default=2)
        p.add_argument('--limit', type=int, default=0, help='first N frames only')
        p.add_argument('--json', action='store_true', help='one-line JSON')
    ev.set_defaults(func=_cmd_eval)


def _add_train(verbs):
    from .train import seg
    train = verbs.add_parser('train', help='train, quantize (PTQ/QAT) the lane or flow model')
    tasks = train.add_subparsers(dest='task', required=True, metavar='TASK')
    seg.add_arguments(tasks.add_parser('seg', help='lane segmentation U-Net'))
    try:
        from .train import flow
    except ImportError:  # pragma: no cover - flow training lands with its issue
        flow = None
    if flow is not None:
        flow.add_arguments(tasks.add_parser('flow', help='quantizable FlowNetSimple'))
    train.set_defaults(func=_cmd_train)


def _cmd_bag_make(args):
    from .bag.make import make_bag
    summary = make_bag(args.out, frames=args.frames, seed=args.seed, storage=args.storage,
                       height=args.size[0], width=args.size[1], encoding=args.encoding,
                       progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_bag_info(args):
    from .bag.io import bag_info
    print(json.dumps(bag_info(args.bag), indent=2))
    return 0


def _ros_session(work):
    """Run ``work()`` between rclpy.init and try_shutdown (Humble..Kilted portable)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    rclpy.init(args=[])   # our argv is not ROS arguments (FROM:=TO would become a remap)
    try:
        return work()
    except (KeyboardInterrupt, ExternalShutdownException):
        return None
    finally:
        rclpy.try_shutdown()


def _cmd_bag_play(args):
    from .bag.play import play, PlayOptions
    remap = tuple(tuple(r.split(':=', 1)) for r in args.remap)
    if any(len(r) != 2 for r in remap):
        raise ValueError('--remap takes FROM:=TO pairs')
    options = PlayOptions(rate=args.rate, loop=args.loop, loops=args.loops,
                          topics=tuple(args.topics) if args.topics else None,
                          clock=args.clock, clock_hz=args.clock_hz,
                          delay=args.delay, wait_for_subscribers=args.wait_for_subscribers,
                          wait_topics=tuple(args.wait_for),
                          wait_for_acks=args.wait_for_all_acked, remap=remap)
    stats = _ros_session(lambda: play(args.bag, options))
    if stats is not None:
        print(json.dumps(stats, indent=2))
    return 0


def _cmd_bag_record(args):
    from .bag.record import record
    stats = _ros_session(lambda: record(args.out, args.topics, duration=args.duration,
                                        types=args.types, storage=args.storage,
                                        use_sim_time=args.use_sim_time,
                                        max_messages=args.messages))
    if stats is not None:
        print(json.dumps(stats, indent=2))
    return 0


def _cmd_bag_eval(args):
    from .bag.eval import evaluate_bag, format_report
    report = evaluate_bag(args.input, args.output, mask_topic=args.mask_topic,
                          flow_topic=args.flow_topic, run_pipeline=args.run_pipeline,
                          image_topic=args.image_topic, gt_flow_stamp=args.gt_flow_stamp)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _add_bag(verbs):
    bag = verbs.add_parser('bag', help='rosbag2 bags: make, info, play, record, eval')
    bag_verbs = bag.add_subparsers(dest='bag_command', required=True, metavar='VERB')
    make = bag_verbs.add_parser(
        'make', help='record the synthetic drive into a bag, CARLA-bridge style',
        description='Camera (bgra8) + camera_info on the CARLA bridge topics, ground-truth '
                    'lane mask, lane ids, flow and flow validity under /lane_seg/gt/.')
    make.add_argument('--out', required=True, help='bag directory to create')
    make.add_argument('--frames', type=int, default=20)
    make.add_argument('--seed', type=int, default=0)
    make.add_argument('--storage', choices=['mcap', 'sqlite3'], default='mcap')
    make.add_argument('--size', type=_size, default=(256, 512), help='HxW (default 256x512)')
    make.add_argument('--encoding', default='bgra8', help='camera encoding (default bgra8)')
    make.add_argument('--quiet', action='store_true', help='no progress bar')
    make.set_defaults(func=_cmd_bag_make)
    info = bag_verbs.add_parser('info', help='topics, types, counts and time span of a bag')
    info.add_argument('bag')
    info.set_defaults(func=_cmd_bag_info)
    play = bag_verbs.add_parser('play', help='publish a bag through rclpy with its timing')
    play.add_argument('bag')
    play.add_argument('--rate', type=_positive, default=1.0, help='speed factor (default 1)')
    play.add_argument('--loop', action='store_true', help='replay until interrupted')
    play.add_argument('--loops', type=int, default=None, help='play N passes')
    play.add_argument('--topics', nargs='+', help='only these topics')
    play.add_argument('--clock', action='store_true', help='publish /clock')
    play.add_argument('--clock-hz', type=_positive, default=40.0,
                      help='/clock rate while waiting between messages (default 40)')
    play.add_argument('--delay', type=float, default=0.0, help='seconds before playing')
    play.add_argument('--wait-for-subscribers', type=float, default=2.0, metavar='S',
                      help='wait up to S seconds for subscribers (default 2)')
    play.add_argument('--wait-for', nargs='+', default=[], metavar='TOPIC',
                      help='topics that must have a subscriber before playing (default: any)')
    play.add_argument('--wait-for-all-acked', type=float, default=0.0, metavar='S',
                      help='at the end, wait up to S seconds for reliable subscribers to '
                           'acknowledge every message (default 0)')
    play.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO')
    play.set_defaults(func=_cmd_bag_play)
    record = bag_verbs.add_parser('record', help='record live topics into a bag')
    record.add_argument('--out', required=True, help='bag directory to create')
    record.add_argument('--topics', nargs='+', required=True)
    record.add_argument('--types', nargs='+', help='message type of each topic, in order '
                        '(default: discovered from the graph)')
    record.add_argument('--duration', type=_positive, default=None, help='seconds')
    record.add_argument('--messages', type=int, default=None,
                        help='stop after this many messages in all')
    record.add_argument('--storage', choices=['mcap', 'sqlite3'], default='mcap')
    record.add_argument('--use-sim-time', action='store_true',
                        help='stamp messages with /clock time (with `bag play --clock`)')
    record.set_defaults(func=_cmd_bag_record)
    ev = bag_verbs.add_parser(
        'eval', help="IoU, EPE, latency and counts of outputs against a bag's ground truth")
    ev.add_argument('--input', required=True, help='bag with camera images and ground truth')
    ev.add_argument('--output', help='bag with the recorded outputs (default: --input)')
    ev.add_argument('--run-pipeline', action='store_true',
                    help='run the lane and flow pipelines offline on the camera images')
    ev.add_argument('--mask-topic', help='mask output topic (default /lane_seg_node/mask)')
    ev.add_argument('--flow-topic', help='flow output topic (default /flow_node/flow)')
    ev.add_argument('--image-topic', default='/carla/ego_vehicle/rgb_front/image')
    ev.add_argument('--gt-flow-stamp', choices=['newer', 'older'], default='newer',
                    help="truth flow K-1 -> K stamped with frame K (newer: lane_seg's "
                         'convention, the default) or with frame K-1 (older: bags from '
                         'sources that stamp it so)')
    ev.add_argument('--json', action='store_true', help='print one JSON object')
    ev.set_defaults(func=_cmd_bag_eval)


def _cmd_bench(args):
    from .bench import run_bench
    report = run_bench(models=args.models, backends=args.backends, frames=args.frames,
                       out=args.out, threads=args.threads, size=args.size, seed=args.seed,
                       opencv=not args.no_opencv, memory=not args.no_memory,
                       progress=not args.quiet)
    print((Path(args.out) / 'bench.md').read_text())
    print('wrote ' + ', '.join(report['written']))
    return 0


def _add_bench(verbs):
    bench = verbs.add_parser(
        'bench', help='latency, throughput, accuracy and memory of every model x backend',
        description='Measure each shipped model (or --models paths) on each available backend '
                    'and the OpenCV flow methods on a synthetic 800x600 bgra8 drive; write '
                    'bench.json, bench.md and plots into --out.')
    bench.add_argument('--models', nargs='+', default=None,
                       help='model paths, or lanes / flow for the shipped fp32 + int8 models '
                       '(default: lanes flow)')
    bench.add_argument('--backends', nargs='+', default=None,
                       choices=['onnxruntime', 'torch', 'tensorrt'],
                       help='default: every backend usable here')
    bench.add_argument('--frames', type=int, default=100, help='timed frames per configuration')
    bench.add_argument('--out', default='docs/bench', help='output folder (default docs/bench)')
    bench.add_argument('--threads', type=int, default=2)
    bench.add_argument('--size', type=_size, default=(600, 800), help='HxW (default 600x800)')
    bench.add_argument('--seed', type=int, default=1000, help='synthetic drive seed')
    bench.add_argument('--no-opencv', action='store_true', help='skip the OpenCV flow methods')
    bench.add_argument('--no-memory', action='store_true', help='skip the peak-memory probes')
    bench.add_argument('--quiet', action='store_true', help='no progress bar')
    bench.set_defaults(func=_cmd_bench)


def _cmd_model_info(args):
    from .model_info import format_model_info, model_info
    info = model_info(args.path)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_model_info(info))
    return 0


def _add_model(verbs):
    model = verbs.add_parser('model', help='inspect models')
    model_verbs = model.add_subparsers(dest='model_command', required=True, metavar='VERB')
    info = model_verbs.add_parser(
        'info', help="print a model's metadata (ONNX, checkpoint or engine cache entry)",
        description='Print the self-describing metadata of a model; refuse (exit 2) a model '
                    'without it, listing what is missing.')
    info.add_argument('path')
    info.add_argument('--json', action='store_true', help='print JSON')
    info.set_defaults(func=_cmd_model_info)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='lane-seg', description='lane_seg: int8 lane segmentation and optical flow.')
    verbs = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    demo = verbs.add_parser('demo', help='render a short synthetic drive to pictures/video')
    demo.add_argument('--out', default='out/demo', help='output folder (default out/demo)')
    demo.add_argument('--frames', type=int, default=60)
    demo.add_argument('--seed', type=int, default=11)
    demo.add_argument('--size', type=_size, default=(256, 512), help='HxW (default 256x512)')
    demo.add_argument('--no-video', action='store_true', help='skip drive.mp4')
    demo.add_argument('--quiet', action='store_true', help='no progress bar')
    demo.set_defaults(func=_cmd_demo)

    sim = verbs.add_parser('sim', help='the synthetic drive')
    sim_verbs = sim.add_subparsers(dest='sim_command', required=True, metavar='VERB')
    export = sim_verbs.add_parser(
        'export', help='write a synthetic sequence in the folder layout',
        description='Write images/, masks/, markings/, flow/, flow_valid/ and camera.yaml.')
    export.add_argument('--out', required=True, help='output folder')
    export.add_argument('--frames', type=int, default=100)
    export.add_argument('--seed', type=int, default=0)
    export.add_argument('--start', type=int, default=0, help='first frame index of the drive')
    export.add_argument('--size', type=_size, default=(256, 512), help='HxW (default 256x512)')
    export.add_argument('--quiet', action='store_true', help='no progress bar')
    export.set_defaults(func=_cmd_sim_export)
    bench = sim_verbs.add_parser('bench', help='measure rendering frames per second')
    bench.add_argument('--size', type=_size, nargs='+', default=[(256, 512), (600, 800)])
    bench.add_argument('--frames', type=int, default=30)
    bench.add_argument('--seeds', type=int, default=3)
    bench.set_defaults(func=_cmd_sim_bench)

    run = verbs.add_parser(
        'run', help='run the synthetic camera and both ROS nodes in one process',
        description='Compose camera_sim_node, lane_seg_node and flow_node in one process '
                    '(multi-threaded executor), write overlay/flow pictures and a latency '
                    'summary to --out and print the summary.')
    run.add_argument('--params', default='config/sim.yaml',
                     help='ROS parameter file (default config/sim.yaml)')
    run.add_argument('--duration', type=_positive, default=5.0, help='seconds (default 5)')
    run.add_argument('--out', default='out/run', help='output folder (default out/run)')
    run.add_argument('--pictures', type=int, default=4, help='pictures of each kind')
    run.set_defaults(func=_cmd_run)
    _add_train(verbs)
    _add_export(verbs)
    _add_eval(verbs)
    _add_bag(verbs)
    _add_bench(verbs)
    _add_model(verbs)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from .engines.base import EngineError
    try:
        return args.func(args)
    except (ValueError, OSError, EngineError) as exc:
        print(f'lane-seg: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
