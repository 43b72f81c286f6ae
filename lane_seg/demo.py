"""
The main job of the README: a short synthetic drive rendered to pictures and a video.

For every frame: the camera image, the lane overlay (ground-truth boundaries in colour, one
colour per boundary instance) and the colour-coded ground-truth flow (Middlebury colours).
"""

import json
from pathlib import Path
import time

import cv2
import numpy as np
from tqdm import tqdm

from .flow.viz import color_wheel_legend, flow_to_color
from .sim import DriveConfig, SyntheticDrive

# BGR colours for lane-boundary instances 1..5 (left to right).
LANE_COLORS = np.array([[0, 0, 0], [0, 0, 255], [0, 200, 255], [0, 255, 0], [255, 200, 0],
                        [255, 0, 255]], np.uint8)


def lane_overlay(image: np.ndarray, lane_mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Draw lane-boundary instances over a BGR image."""
    ids = np.clip(lane_mask, 0, len(LANE_COLORS) - 1)
    colour = LANE_COLORS[ids]
    on = lane_mask > 0
    out = image.copy()
    out[on] = (image[on] * (1 - alpha) + colour[on] * alpha).astype(np.uint8)
    return out


def panel(frame, max_flow: float | None = None) -> np.ndarray:
    """Image | lane overlay | flow colours, side by side, with captions."""
    # Dense flow: defined everywhere except behind the camera (occluded pixels included).
    flow_vis = flow_to_color(frame.flow, max_flow=max_flow)
    tiles = [frame.image, lane_overlay(frame.image, frame.lane_mask), flow_vis]
    captions = ['camera', 'lane boundaries (ground truth)', 'optical flow (ground truth)']
    out = []
    for tile, text in zip(tiles, captions):
        tile = tile.copy()
        cv2.putText(tile, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3,
                    cv2.LINE_AA)
        cv2.putText(tile, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
        out.append(tile)
    return np.concatenate(out, axis=1)


def run_demo(out, frames: int = 60, seed: int = 11, height: int = 256, width: int = 512,
             video: bool = True, progress: bool = True) -> dict:
    """Render the drive and write ``strip.png``, ``drive.mp4`` and ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drive = SyntheticDrive(DriveConfig.sized(seed, height, width))
    writer = None
    strip_rows = []
    picks = set(np.linspace(0, frames - 1, 4).round().astype(int).tolist())
    t0 = time.perf_counter()
    it = drive.frames(frames)
    if progress:
        it = tqdm(it, total=frames, desc='synthetic drive', unit='frame')
    for frame in it:
        row = panel(frame, max_flow=20.0)
        if video:
            if writer is None:
                writer = cv2.VideoWriter(str(out / 'drive.mp4'),
                                         cv2.VideoWriter_fourcc(*'mp4v'),
                                         drive.config.fps, (row.shape[1], row.shape[0]))
            writer.write(row)
        if frame.index in picks:
            strip_rows.append(row)
            cv2.imwrite(str(out / f'frame_{frame.index:06d}.png'), row)
    elapsed = time.perf_counter() - t0
    if writer is not None:
        writer.release()
    strip = np.concatenate(strip_rows, axis=0)
    cv2.imwrite(str(out / 'strip.png'), strip)
    cv2.imwrite(str(out / 'flow_legend.png'), color_wheel_legend(129))
    summary = {
        'frames': frames, 'seed': seed, 'size': [height, width],
        'weather': drive.weather.name, 'lanes': drive.road.lanes,
        'render_fps': round(frames / elapsed, 2),
        'outputs': sorted(p.name for p in out.iterdir()),
    }
    (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    return summary
