"""
Make docs/images/bag_replay.png: the lane overlay and the flow of a replayed bag.

Records the synthetic drive into a bag (``lane-seg bag make``), replays its camera images
through the shipped pipelines offline with the code ``lane-seg bag eval --run-pipeline`` uses,
and draws one frame: the camera image with the predicted lane mask overlaid, and the
predicted flow (previous frame -> this one) in Middlebury colours.  Also prints the
``bag eval --run-pipeline`` report of the same bag as JSON.

Run from the repository root: ``.venv/bin/python docs/scripts/bag_figure.py [--keep BAG]``.
"""

import argparse
import json
from pathlib import Path
import tempfile

import cv2
from lane_seg.bag.eval import (evaluate_bag, flow_runner, lane_runner, load_pipelines,
                               replay)
from lane_seg.bag.io import BagReader, header_stamp_ns, IMAGE_TOPIC
from lane_seg.bag.make import make_bag
from lane_seg.flow.viz import flow_to_color
from lane_seg.image_conversion import to_bgr8
import numpy as np

FRAMES, SEED, HEIGHT, WIDTH = 8, 5, 600, 800
SHOW = FRAMES - 1            # the frame drawn (its flow comes from frame SHOW - 1)
LANE_BGR = (0, 255, 255)     # predicted lane pixels, yellow
OUT = Path('docs/images/bag_replay.png')


def camera_image(bag_path, stamp):
    """Return the bag's camera image at ``stamp`` as BGR."""
    with BagReader(bag_path) as bag:
        for m in bag.messages([IMAGE_TOPIC]):
            msg = bag.decode(m)
            if header_stamp_ns(msg) == stamp:
                return to_bgr8(msg)
    raise LookupError(f'no camera image at {stamp}')


def caption(tile, text):
    out = tile.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 34), (0, 0, 0), -1)
    cv2.putText(out, text, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2,
                cv2.LINE_AA)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--keep', type=Path, help='write the bag here and keep it')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bag = args.keep or Path(tmp) / 'drive_bag'
        make_bag(bag, frames=FRAMES, seed=SEED, height=HEIGHT, width=WIDTH)
        lanes, flow = load_pipelines()
        masks = replay(bag, lane_runner(lanes))
        flows = replay(bag, flow_runner(flow))
        stamp = sorted(masks)[SHOW]
        image = camera_image(bag, stamp)
        mask = masks[stamp] > 0
        overlay = image.copy()
        overlay[mask] = (0.4 * image[mask] + 0.6 * np.array(LANE_BGR)).astype(np.uint8)
        colours = flow_to_color(flows[stamp], max_flow=20.0)
        figure = np.concatenate([caption(overlay, f'frame {SHOW}: predicted lanes'),
                                 caption(colours, f'predicted flow {SHOW - 1} -> {SHOW}')],
                                axis=1)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(OUT), figure)
        report = evaluate_bag(bag, run_pipeline=True, pipelines=(lanes, flow))
    print(json.dumps(report, indent=2))
    print(f'wrote {OUT} ({figure.shape[1]}x{figure.shape[0]})')


if __name__ == '__main__':
    main()
