"""The ``lane-seg`` command line: thin verbs over the package's pure modules."""

import argparse
import json
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
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f'lane-seg: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
