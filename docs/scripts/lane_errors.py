"""
Where the lane model loses IoU, and whether geometry can win it back.

For a model on a folder export (``lane-seg sim export``) this measures, at the label's
resolution: IoU and F1; recall within 2 pixels on the painted label pixels and on those in the
gaps between dashes (the label follows the CULane convention and runs through the gaps);
recall by image row band; the IoU ceiling of the model's output resolution (the label itself
area-resized to the logit map and back). Then it tries a geometric completion of the
thresholded map (bridge dash gaps, extend the lowest piece of each line to the edge) and
reports the IoU with it and the pixels it adds, on and off the label. The completion is kept
here, not in the package: it lowered IoU on the validation set (docs/lane_model.md).

Run from the repository root:
``.venv/bin/python docs/scripts/lane_errors.py --data DIR [--model int8] [--out FILE]``.
"""

import argparse
from dataclasses import dataclass
import json
import math
from pathlib import Path

import cv2
from lane_seg.evaluate import _model_path
from lane_seg.pipeline.lanes import LanePipeline
import numpy as np

BANDS = [(0.35, 0.5), (0.5, 0.65), (0.65, 0.8), (0.8, 1.0)]


@dataclass(frozen=True)
class Completion:
    """Limits of the geometric completion, in pixels of the logit map."""

    end_rows: int = 12      # rows behind an end that give its slope
    skip_rows: int = 2      # rows at the tapering tip left out of the fit
    min_rows: int = 6       # an end needs a single steep line at least this long
    max_run: int = 10       # wider runs are not a steep line
    max_gap: float = 0.6    # a bridge spans at most this fraction of the map's height
    max_offset: float = 2.5  # lateral miss allowed across a gap
    max_angle_deg: float = 12.0
    extend: bool = True     # extend unlinked lower ends to the map's edge


def _runs(binary):
    padded = np.zeros((binary.shape[0], binary.shape[1] + 2), np.int8)
    padded[:, 1:-1] = binary != 0
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    out = [[] for _ in range(binary.shape[0])]
    for y, x0, x1 in zip(rows.tolist(), starts.tolist(), (stops - 1).tolist()):
        out[y].append((x0, x1))
    return out


def _touching(run, row):
    x0, x1 = run
    return [k for k, (a, b) in enumerate(row) if a <= x1 + 1 and x0 <= b + 1]


def _trace(runs, y, k, step, cfg):
    ys, xs = [], []
    while 0 <= y < len(runs) and len(ys) < cfg.end_rows:
        x0, x1 = runs[y][k]
        if x1 - x0 + 1 > cfg.max_run:
            break
        ys.append(y)
        xs.append(0.5 * (x0 + x1))
        ny = y + step
        if not 0 <= ny < len(runs):
            break
        nxt = _touching(runs[y][k], runs[ny])
        if len(nxt) != 1 or len(_touching(runs[ny][nxt[0]], runs[y])) != 1:
            break
        y, k = ny, nxt[0]
    return ys, xs


def _ends(runs, cfg):
    """(x, y, slope dx/dy, lower) of every line end with a single steep line behind it."""
    ends = []
    for y, row in enumerate(runs):
        for k, run in enumerate(row):
            for lower, step in ((True, -1), (False, 1)):
                beyond = y - step
                if 0 <= beyond < len(runs) and _touching(run, runs[beyond]):
                    continue
                if (lower and y == len(runs) - 1) or (not lower and y == 0):
                    continue
                ys, xs = _trace(runs, y, k, step, cfg)
                if len(ys) < cfg.min_rows:
                    continue
                skip = min(cfg.skip_rows, len(ys) - 2)
                slope, offset = np.polyfit(ys[skip:], xs[skip:], 1)
                ends.append((float(slope * y + offset), y, float(slope), lower))
    return ends


def completion_segments(binary, cfg):
    """Bridges across dash gaps and extensions to the map's edge, in map pixels."""
    height, width = binary.shape
    ends = _ends(_runs(binary), cfg)
    lowers = [e for e in ends if e[3]]
    uppers = [e for e in ends if not e[3]]
    pairs = []
    for i, (xa, ya, sa, _) in enumerate(lowers):
        for j, (xb, yb, sb, _) in enumerate(uppers):
            gap = yb - ya
            tolerance = cfg.max_offset + 0.05 * gap
            if (0 < gap <= cfg.max_gap * height
                    and abs(math.atan(sa) - math.atan(sb)) <= math.radians(cfg.max_angle_deg)
                    and abs(xa + sa * gap - xb) <= tolerance
                    and abs(xb - sb * gap - xa) <= tolerance):
                pairs.append((gap, i, j))
    done_low, done_up, segments = set(), set(), []
    for _, i, j in sorted(pairs):
        if i not in done_low and j not in done_up:
            done_low.add(i)
            done_up.add(j)
            segments.append((lowers[i][:2], uppers[j][:2]))
    for i, (x, y, slope, _) in enumerate(lowers):
        if i in done_low or not cfg.extend:
            continue
        ey, ex = height - 1, x + slope * (height - 1 - y)
        if not 0 <= ex <= width - 1:
            ex = 0.0 if ex < 0 else float(width - 1)
            ey = y + (ex - x) / slope
        if ey - y >= 1:
            segments.append(((x, y), (ex, ey)))
    return segments


def draw(mask, segments, sx, sy, thickness):
    for p0, p1 in segments:
        a = [int(round(((v + 0.5) * s - 0.5) * 16)) for v, s in zip(p0, (sx, sy))]
        b = [int(round(((v + 0.5) * s - 0.5) * 16)) for v, s in zip(p1, (sx, sy))]
        cv2.line(mask, tuple(a), tuple(b), 255, thickness, cv2.LINE_8, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', required=True, help='folder export (images/, masks/, markings/)')
    ap.add_argument('--model', default='int8')
    ap.add_argument('--backend', default='auto')
    ap.add_argument('--out', default='')
    args = ap.parse_args()
    root = Path(args.data)
    pipe = LanePipeline.from_model(_model_path(args.model, 'seg'), backend=args.backend)
    threshold = pipe._score_threshold
    configs = {'none': None, 'default': Completion(), 'bridges only': Completion(extend=False),
               'long fit': Completion(end_rows=32, skip_rows=4, min_rows=12)}
    acc = {}

    def add(key, hit, total):
        s = acc.setdefault(key, [0, 0])
        s[0] += int(hit)
        s[1] += int(total)

    tol = np.ones((5, 5), np.uint8)   # 2-pixel tolerance
    near = np.ones((9, 9), np.uint8)  # 4 pixels: an added pixel beside the label
    for image_path in sorted((root / 'images').glob('*.png')):
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(root / 'masks' / image_path.name), cv2.IMREAD_UNCHANGED) > 0
        paint = cv2.imread(str(root / 'markings' / image_path.name), cv2.IMREAD_UNCHANGED) > 0
        paint = cv2.dilate(paint.astype(np.uint8), tol) > 0
        res = pipe(image, 'bgr8' if image.shape[2] == 3 else 'bgra8')
        pred = res.mask > 0
        reach = cv2.dilate(pred.astype(np.uint8), tol) > 0
        add('recall_painted', (gt & paint & reach).sum(), (gt & paint).sum())
        add('recall_gaps', (gt & ~paint & reach).sum(), (gt & ~paint).sum())
        h = gt.shape[0]
        for a, b in BANDS:
            rows = slice(int(a * h), int(b * h))
            add(f'recall_rows_{a}-{b}', (gt[rows] & reach[rows]).sum(), gt[rows].sum())
        box, small_hw = res.box, res.logits.shape
        label = gt[box.top:box.bottom, box.left:box.right].astype(np.float32)
        back = cv2.resize(cv2.resize(label, small_hw[::-1], interpolation=cv2.INTER_AREA),
                          (box.width, box.height), interpolation=cv2.INTER_LINEAR) > 0.5
        roi_gt = gt[box.top:box.bottom, box.left:box.right]
        add('ceiling_iou', (back & roi_gt).sum(), (back | roi_gt).sum())
        binary = (res.logits > threshold).astype(np.uint8)
        label_near = cv2.dilate(gt.astype(np.uint8), near) > 0
        for name, cfg in configs.items():
            mask = res.mask.copy()
            if cfg is not None:
                draw(mask[box.top:box.bottom, box.left:box.right],
                     completion_segments(binary, cfg), box.width / small_hw[1],
                     box.height / small_hw[0], max(3, round(gt.shape[1] / 100)))
            out = mask > 0
            add(f'iou[{name}]', (out & gt).sum(), (out | gt).sum())
            added = out & ~pred
            add(f'added_on_label[{name}]', (added & gt).sum(), added.sum())
            add(f'added_beside_label[{name}]', (added & ~gt & label_near).sum(), added.sum())
    result = {'model': pipe.model, 'data': str(root),
              'frames': len(list((root / 'images').glob('*.png'))),
              'configs': {k: (vars(v) if v else None) for k, v in configs.items()}}
    for key, (hit, total) in acc.items():
        result[key] = {'fraction': round(hit / max(total, 1), 4), 'of': total}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')


if __name__ == '__main__':
    main()
