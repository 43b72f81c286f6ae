"""
``lane-seg bag eval``: accuracy, latency and counts of lane masks and flow against a bag's truth.

Ground truth comes from a bag written by ``lane-seg bag make`` (``/lane_seg/gt/lane_mask`` and
``/lane_seg/gt/flow`` + ``flow_valid``) or recorded from ``camera_sim_node`` (its ``~/lane_mask``
and ``~/flow``). Outputs come from

* ``--output BAG``: a bag recorded while the nodes ran (``lane-seg bag record``), or
* the input bag itself when it also holds the outputs, or
* ``--run-pipeline``: the package's pipelines run offline on the bag's camera images.

Outputs are matched to the ground truth **by header stamp** (as multisets: a looped bag holds
every stamp once per pass).  Per stream the report counts ``inputs`` (ground-truth messages),
``outputs``, ``matched``, ``missing`` (truth with no output), ``duplicates`` (more outputs than
truth for a stamp), ``unmatched`` (outputs at stamps with no truth), ``rejected`` (matched but
of the wrong encoding or size) and ``decode_errors``; it scores the matched pairs with
:mod:`lane_seg.metrics`: ``iou``/``f1`` (mean over frames) and ``iou_pooled``/``f1_pooled``
(from summed pixel counts) for masks (non-zero = lane), ``epe`` (mean over frames),
``epe_pixels`` (mean over all valid pixels) and ``fl_all`` (pooled) for flow.  Flow outputs and
flow truth both follow lane_seg's flow convention (``flow_node``'s ``~/flow``, ``bag make``'s and
``camera_sim_node``'s ground truth): the forward flow from frame K-1 to K on frame K-1's grid,
stamped with frame K, the truth NaN where invalid.  A bag whose truth is stamped with the
older frame K-1 instead (recorded from other tools, or from ``camera_sim_node`` and
``carla_camera_node`` before they followed the convention) is read with
``--gt-flow-stamp older``, which moves each truth flow to the next camera image's stamp.

Latency, from the best source available: per-call timing with ``--run-pipeline``; recorded
latency topics (``std_msgs`` Float32/Float64 whose name contains ``latency``, in ms) and
``latency`` keys of ``/diagnostics``; otherwise receive time (the recorded bag timestamp) minus
header stamp of each output, reported only when both are on one clock (recorded with
``use_sim_time`` during ``bag play --clock``, or live) and flagged ``clock_mismatch`` otherwise.
"""

import heapq
import math
import time

import numpy as np

from .io import (BagError, BagReader, DecodeError, GT_FLOW_TOPIC, GT_FLOW_VALID_TOPIC,
                 GT_LANE_MASK_TOPIC, header_stamp_ns, IMAGE_TOPIC)
from ..image_conversion import image_to_numpy, ImageConversionError
from ..metrics import epe, f1_from_counts, fl_all, flow_valid_count, iou_from_counts, lane_counts

SIM_LANE_MASK_TOPIC = '/camera_sim_node/lane_mask'
SIM_FLOW_TOPIC = '/camera_sim_node/flow'
MASK_TOPICS = ('/lane_seg_node/mask', '/lane_seg/mask')
FLOW_TOPICS = ('/flow_node/flow', '/lane_seg/flow')
PERCENTILES = (50, 90, 95, 99)
MAX_PLAUSIBLE_LATENCY_S = 60.0


class PipelineUnavailableError(BagError):
    """``--run-pipeline`` without ``lane_seg.pipeline.lanes`` / ``.flow`` importable."""


def load_pipelines():
    """Return ``(LanePipeline.from_model(), FlowPipeline.from_model())``."""
    try:
        from ..pipeline.flow import FlowPipeline
        from ..pipeline.lanes import LanePipeline
    except ImportError as exc:
        raise PipelineUnavailableError(
            f'--run-pipeline needs lane_seg.pipeline.lanes.LanePipeline and '
            f'lane_seg.pipeline.flow.FlowPipeline, which cannot be imported ({exc}); '
            "record the nodes' outputs and pass --output instead") from None
    try:
        return LanePipeline.from_model(), FlowPipeline.from_model()
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise PipelineUnavailableError(
            f'cannot load the shipped lane/flow pipelines: {type(exc).__name__}: {exc}'
        ) from exc


def percentiles(values):
    """count, mean, p50/p90/p95/p99 and max of ``values`` (ms), or just count 0."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not arr.size:
        return {'count': 0}
    out = {'count': int(arr.size), 'mean_ms': round(float(arr.mean()), 3)}
    for p in PERCENTILES:
        out[f'p{p}_ms'] = round(float(np.percentile(arr, p)), 3)
    out['max_ms'] = round(float(arr.max()), 3)
    return out


def _finite(value, digits=6):
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


# ------------------------------------------------------------------------- streams


class _Stream:
    """Decoded messages of some topics of a bag as ``(stamp_ns, payload)``, errors counted."""

    def __init__(self, path, topics):
        self.path = path
        self.topics = list(topics)
        self.decode_errors = 0
        self.warnings = []
        self.stamps_back = 0
        self.repeats = 0

    def items(self):
        # counted on the first topic only: a truth flow and its validity mask share a stamp
        seen, last, primary = set(), None, self.topics[0] if self.topics else None
        with BagReader(self.path) as bag:
            for m in bag.messages(self.topics):
                try:
                    msg = bag.decode(m)
                except DecodeError as exc:
                    self.decode_errors += 1
                    self.warnings.append(str(exc))
                    continue
                stamp = header_stamp_ns(msg)
                if stamp is None:
                    continue
                if m.topic == primary:
                    if last is not None and stamp < last:
                        self.stamps_back += 1
                    if stamp in seen:
                        self.repeats += 1
                    seen.add(stamp)
                    last = stamp
                yield stamp, (m.topic, msg, m.timestamp)
            self.warnings.extend(bag.warnings)


def _decode_image(msg, encoding):
    if msg.encoding != encoding:
        raise ImageConversionError(f'encoding {msg.encoding!r}, expected {encoding!r}')
    return np.array(image_to_numpy(msg))


def _gt_masks(stream):
    for stamp, (_, msg, _) in stream.items():
        try:
            yield stamp, _decode_image(msg, 'mono8') != 0
        except ImageConversionError as exc:
            stream.decode_errors += 1
            stream.warnings.append(f'ground-truth mask at {stamp}: {exc}')


def _gt_flows(stream, flow_topic):
    """Pair the truth flow with its validity mask of the same stamp (all valid if absent)."""
    flows, valids = {}, {}

    def ready(stamp):
        flow = flows.pop(stamp)
        valid = valids.pop(stamp, None)
        return stamp, (flow, np.ones(flow.shape[:2], bool) if valid is None else valid)

    paired = len(stream.topics) > 1
    for stamp, (topic, msg, _) in stream.items():
        try:
            if topic == flow_topic:
                flows[stamp] = _decode_image(msg, '32FC2')
            else:
                valids[stamp] = _decode_image(msg, 'mono8') != 0
        except ImageConversionError as exc:
            stream.decode_errors += 1
            stream.warnings.append(f'ground truth {topic} at {stamp}: {exc}')
            continue
        if stamp in flows and (stamp in valids or not paired):
            yield ready(stamp)
        if len(flows) > 4:   # a validity mask long overdue: score those flows with all valid
            for old in sorted(s for s in flows if s < stamp):
                yield ready(old)
    for stamp in sorted(flows):
        yield ready(stamp)


def _next_stamps(path, topic):
    """Map each image stamp to the next one (none across a jump back, e.g. a loop seam)."""
    stream = _Stream(path, [topic])
    order = [stamp for stamp, _ in stream.items()]
    return {a: b for a, b in zip(order, order[1:]) if b > a}


def _restamped(items, mapping):
    for stamp, payload in items:
        if stamp in mapping:
            yield mapping[stamp], payload


def _outputs(stream, encoding):
    for stamp, (topic, msg, received) in stream.items():
        try:
            yield stamp, (_decode_image(msg, encoding), received)
        except ImageConversionError as exc:
            yield stamp, (exc, received)


# ------------------------------------------------------------------------- matching


class _Score:
    """Match two stamp streams as multisets and score the pairs."""

    def __init__(self, kind):
        self.kind = kind
        self.counts = {'inputs': 0, 'outputs': 0, 'matched': 0, 'missing': 0,
                       'duplicates': 0, 'unmatched': 0, 'rejected': 0}
        self.rejections = []
        self.frames = []
        self.pooled = [0, 0, 0]
        self.flow_err_sum = 0.0
        self.flow_pixels = 0
        self.flow_outliers = 0.0
        self.latency_ms = []

    def run(self, truth, outputs):
        gt_pending, out_pending, matched = {}, {}, set()
        merged = heapq.merge(((s, 0, p) for s, p in truth), ((s, 1, p) for s, p in outputs),
                             key=lambda item: item[0])
        for stamp, side, payload in merged:
            if side == 0:
                self.counts['inputs'] += 1
                outs = out_pending.get(stamp)
                if outs:
                    self._pair(stamp, payload, outs.pop(0), matched)
                else:
                    gt_pending.setdefault(stamp, []).append(payload)
            else:
                self.counts['outputs'] += 1
                gts = gt_pending.get(stamp)
                if gts:
                    self._pair(stamp, gts.pop(0), payload, matched)
                else:
                    out_pending.setdefault(stamp, []).append(payload)
        self.counts['missing'] = sum(len(v) for v in gt_pending.values())
        for stamp, outs in out_pending.items():
            key = 'duplicates' if stamp in matched else 'unmatched'
            self.counts[key] += len(outs)
        self.missing_stamps = sorted(s for s, v in gt_pending.items() if v)[:20]
        return self

    def _pair(self, stamp, truth, output, matched):
        matched.add(stamp)
        self.counts['matched'] += 1
        value, received = output
        if received is not None:
            self.latency_ms.append((received - stamp) / 1e6)
        if isinstance(value, Exception):
            self._reject(stamp, str(value))
            return
        gt = truth[0] if self.kind == 'flow' else truth
        if value.shape != gt.shape:
            self._reject(stamp, f'shape {value.shape} != ground truth {gt.shape}')
            return
        if self.kind == 'mask':
            counts = lane_counts(value, gt)
            self.pooled = [a + b for a, b in zip(self.pooled, counts)]
            self.frames.append((iou_from_counts(*counts), f1_from_counts(*counts)))
        else:
            flow_gt, valid = truth
            n = flow_valid_count(flow_gt, valid)
            e = epe(value, flow_gt, valid)
            if n:
                self.flow_err_sum += e * n
                self.flow_pixels += n
                self.flow_outliers += fl_all(value, flow_gt, valid) * n
                self.frames.append(e)

    def _reject(self, stamp, reason):
        self.counts['rejected'] += 1
        if len(self.rejections) < 20:
            self.rejections.append(f'{stamp}: {reason}')

    def report(self):
        out = dict(self.counts)
        if self.kind == 'mask':
            ious = [f[0] for f in self.frames]
            f1s = [f[1] for f in self.frames]
            out.update({
                'scored': len(self.frames),
                'iou': _finite(float(np.mean(ious))) if ious else None,
                'iou_min': _finite(min(ious)) if ious else None,
                'f1': _finite(float(np.mean(f1s))) if f1s else None,
                'iou_pooled': _finite(iou_from_counts(*self.pooled)) if self.frames else None,
                'f1_pooled': _finite(f1_from_counts(*self.pooled)) if self.frames else None,
            })
        else:
            out.update({
                'scored': len(self.frames),
                'epe': _finite(float(np.mean(self.frames))) if self.frames else None,
                'epe_pixels': _finite(self.flow_err_sum / self.flow_pixels)
                if self.flow_pixels else None,
                'fl_all': _finite(self.flow_outliers / self.flow_pixels)
                if self.flow_pixels else None,
            })
        if self.missing_stamps:
            out['missing_stamps'] = self.missing_stamps
        if self.rejections:
            out['rejections'] = self.rejections
        return out


# ------------------------------------------------------------------------- latency


def _received_latency(values):
    stats = percentiles(values)
    if stats['count']:
        median = stats['p50_ms'] / 1000.0
        if median < -0.001 or median > MAX_PLAUSIBLE_LATENCY_S:
            return {'source': 'receive_time', 'count': stats['count'], 'clock_mismatch': True,
                    'note': 'receive times and header stamps are on different clocks; '
                            'record with use_sim_time while playing with --clock'}
    return dict(source='receive_time', **stats)


def _is_latency_key(key):
    """``lane_seg.latency`` keys (``end_to_end_ms.p95``, ``inference_ms.p50``) or 'latency'."""
    key = key.lower()
    return 'latency' in key or '_ms.' in key or key.endswith('_ms')


def _recorded_latency(path):
    """Latency topics (Float32/64, ms) and ``latency`` keys of /diagnostics in a bag."""
    topics, diagnostics = {}, {}
    with BagReader(path) as bag:
        names = [t for t, i in bag.topics.items()
                 if ('latency' in t and i.msgtype in ('std_msgs/msg/Float32',
                                                      'std_msgs/msg/Float64'))
                 or i.msgtype == 'diagnostic_msgs/msg/DiagnosticArray']
        for m in bag.messages(names):
            try:
                msg = bag.decode(m)
            except DecodeError:
                continue
            if m.msgtype == 'diagnostic_msgs/msg/DiagnosticArray':
                for status in msg.status:
                    for kv in status.values:
                        if _is_latency_key(kv.key):
                            try:
                                value = float(kv.value)
                            except ValueError:
                                continue
                            diagnostics.setdefault(status.name, {})[kv.key] = _finite(value)
            else:
                topics.setdefault(m.topic, []).append(float(msg.data))
    out = {t: dict(source='topic', **percentiles(v)) for t, v in topics.items()}
    if diagnostics:
        out['diagnostics'] = {'source': '/diagnostics (last values)', 'values': diagnostics}
    return out


# ------------------------------------------------------------------------- pipeline


def _pipeline_outputs(path, image_topic, run, timings, errors):
    """Run ``run(image, encoding, stamp_s)`` on every camera image; yield (stamp, result)."""
    stream = _Stream(path, [image_topic])
    for stamp, (_, msg, _) in stream.items():
        try:
            image = image_to_numpy(msg)
            start = time.perf_counter()
            result = run(image, msg.encoding, stamp / 1e9)
            timings.append((time.perf_counter() - start) * 1000.0)
        except (ImageConversionError, ValueError) as exc:
            errors.append(f'{stamp}: {exc}')
            continue
        if result is not None:
            yield stamp, (np.asarray(result), None)
    errors.extend(f'camera: {w}' for w in stream.warnings)


def lane_runner(pipe):
    """Wrap a lane pipeline as ``run(image, encoding, stamp_s) -> mask`` for :func:`replay`."""
    def run(image, encoding, stamp_s):
        return pipe(image, encoding).mask
    return run


def flow_runner(fp):
    """Wrap a flow pipeline as ``run(image, encoding, stamp_s) -> flow or None``; resets it."""
    if hasattr(fp, 'reset'):   # a pipeline used before: forget its last frame
        fp.reset('bag eval start')

    def run(image, encoding, stamp_s):
        res = fp(image, encoding, stamp_s)
        if res is None or isinstance(res, np.ndarray):
            return res
        return res.flow
    return run


def replay(path, run, image_topic=IMAGE_TOPIC) -> dict:
    """
    Return ``{stamp_ns: output}`` of one pipeline run over a bag's camera images.

    ``run`` is :func:`lane_runner` or :func:`flow_runner` of a loaded pipeline (or any
    ``run(image, encoding, stamp_s)``); frames are fed exactly as ``bag eval`` feeds them.
    A frame the pipeline cannot use raises ``ValueError`` naming the first ones.
    """
    errors = []
    out = {stamp: value for stamp, (value, _) in
           _pipeline_outputs(path, image_topic, run, [], errors)}
    if errors:
        raise ValueError(f'{path}: {len(errors)} frames could not be used: {errors[:3]}')
    return out


# ------------------------------------------------------------------------- entry point


def _pick(topics, explicit, defaults):
    if explicit:
        return explicit if explicit in topics else None
    for name in defaults:
        if name in topics:
            return name
    suffix = '/' + defaults[0].rsplit('/', 1)[1]
    truth = ('/lane_seg/gt/', '/camera_sim_node/')
    found = sorted(t for t, i in topics.items() if t.endswith(suffix)
                   and not t.startswith(truth) and i.msgtype == 'sensor_msgs/msg/Image')
    return found[0] if found else None


def ground_truth_topics(topics, mask_topic=None, flow_topic=None, flow_stamp=None):
    """
    Pick the truth topics: ``bag make``'s, else ``camera_sim_node``'s.

    Returns ``(mask_topic, flow_topic, valid_topic, flow_stamp)``. ``flow_stamp`` says how the
    truth flow K-1 -> K is stamped: ``'newer'`` (the default, lane_seg's convention: with frame
    K, as ``bag make``, ``camera_sim_node`` and ``flow_node`` stamp it) or ``'older'`` (with
    frame K-1, for bags from sources that stamp it so; only when asked for).
    """
    valid = None
    if mask_topic is None:
        mask_topic = next((t for t in (GT_LANE_MASK_TOPIC, SIM_LANE_MASK_TOPIC) if t in topics),
                          None)
    if flow_topic is None:
        flow_topic = next((t for t in (GT_FLOW_TOPIC, SIM_FLOW_TOPIC) if t in topics), None)
    if flow_topic == GT_FLOW_TOPIC and GT_FLOW_VALID_TOPIC in topics:
        valid = GT_FLOW_VALID_TOPIC
    if flow_stamp not in (None, 'newer', 'older'):
        raise BagError(f"flow stamp convention {flow_stamp!r} is not 'newer' or 'older'")
    return (mask_topic if mask_topic in topics else None,
            flow_topic if flow_topic in topics else None, valid, flow_stamp or 'newer')


def evaluate_bag(input_path, output_path=None, mask_topic=None, flow_topic=None,
                 run_pipeline=False, image_topic=IMAGE_TOPIC, pipelines=None,
                 gt_mask_topic=None, gt_flow_topic=None, gt_flow_stamp=None):
    """
    Evaluate outputs against the ground truth of ``input_path``; returns the report dict.

    ``pipelines``: a ``(lanes, flow)`` pair to use with ``run_pipeline`` instead of
    :func:`load_pipelines` (either may be None to skip that stream).  ``gt_*``: see
    :func:`ground_truth_topics` (default: found in the bag).
    """
    with BagReader(input_path) as bag:
        in_topics = dict(bag.topics)
        input_info = bag.info()
    images = in_topics[image_topic].count if image_topic in in_topics else 0
    gt_mask, gt_flow, gt_valid, flow_stamp = ground_truth_topics(
        in_topics, gt_mask_topic, gt_flow_topic, gt_flow_stamp)
    report = {'input': str(input_path), 'output': None, 'mode': None, 'images': images,
              'ground_truth': {'mask': gt_mask, 'flow': gt_flow, 'flow_valid': gt_valid,
                               'flow_stamp': flow_stamp},
              'input_warnings': input_info['warnings']}
    if gt_mask is None and gt_flow is None:
        raise BagError(f'{input_path} holds no ground truth ({GT_LANE_MASK_TOPIC}, '
                       f"{GT_FLOW_TOPIC}, or camera_sim_node's); make one with "
                       f'`lane-seg bag make`')
    streams = {}
    if run_pipeline:
        lanes, flow = pipelines if pipelines is not None else load_pipelines()
        report['mode'] = 'pipeline'
        timings = {'mask': [], 'flow': []}
        errors = {'mask': [], 'flow': []}
        if lanes is not None:
            streams['mask'] = _pipeline_outputs(input_path, image_topic, lane_runner(lanes),
                                                timings['mask'], errors['mask'])
        if flow is not None:
            streams['flow'] = _pipeline_outputs(input_path, image_topic, flow_runner(flow),
                                                timings['flow'], errors['flow'])
        out_streams = {}
    else:
        out_path = output_path or input_path
        report['output'] = str(out_path)
        report['mode'] = 'recorded'
        with BagReader(out_path) as bag:
            out_topics = dict(bag.topics)
        picked = {'mask': _pick(out_topics, mask_topic, MASK_TOPICS),
                  'flow': _pick(out_topics, flow_topic, FLOW_TOPICS)}
        if not any(picked.values()):
            raise BagError(f'{out_path} has no mask or flow output topic (looked for '
                           f'{mask_topic or ", ".join(MASK_TOPICS)} and '
                           f'{flow_topic or ", ".join(FLOW_TOPICS)}); pass --mask-topic / '
                           f'--flow-topic, --output BAG or --run-pipeline')
        out_streams = {k: _Stream(out_path, [t]) for k, t in picked.items() if t}
        streams = {k: _outputs(s, 'mono8' if k == 'mask' else '32FC2')
                   for k, s in out_streams.items()}
        report['topics'] = {k: t for k, t in picked.items() if t}

    truth_streams = {'mask': _Stream(input_path, [gt_mask]) if gt_mask else None,
                     'flow': _Stream(input_path, [t for t in (gt_flow, gt_valid) if t])
                     if gt_flow else None}
    latency = {}
    for kind in ('mask', 'flow'):
        truth = truth_streams[kind]
        if kind not in streams or truth is None:
            report[kind] = None
            continue
        if kind == 'mask':
            gt_items = _gt_masks(truth)
        else:
            gt_items = _gt_flows(truth, gt_flow)
            if flow_stamp == 'older':   # truth of K-1 -> K stamped K-1: move it to K
                gt_items = _restamped(gt_items, _next_stamps(input_path, image_topic))
        score = _Score(kind).run(gt_items, streams[kind])
        result = score.report()
        result['input_decode_errors'] = truth.decode_errors
        result['input_stamp_jumps_back'] = truth.stamps_back
        result['input_stamp_repeats'] = truth.repeats
        if kind in out_streams:
            result['decode_errors'] = out_streams[kind].decode_errors
            result['warnings'] = out_streams[kind].warnings[:20]
            latency[kind] = _received_latency(score.latency_ms)
        else:
            result['pipeline_errors'] = len(errors[kind])
            result['errors'] = errors[kind][:20]
            latency[kind] = dict(source='pipeline', **percentiles(timings[kind]))
        report[kind] = result
    if not run_pipeline:
        latency.update(_recorded_latency(report['output']))
    report['latency'] = latency
    return report


def format_report(report):
    """Format a report as a few human-readable lines."""
    lines = [f"bag eval: {report['mode']} outputs, {report['images']} camera images"]
    for kind in ('mask', 'flow'):
        r = report.get(kind)
        if not r:
            continue
        names = ('inputs', 'outputs', 'matched', 'missing', 'duplicates', 'unmatched',
                 'rejected')
        counts = ', '.join(f'{k} {r[k]}' for k in names)
        if kind == 'mask':
            acc = f"IoU {r['iou']} (pooled {r['iou_pooled']}), F1 {r['f1']}"
        else:
            acc = f"EPE {r['epe']} px (pixels {r['epe_pixels']}), Fl-all {r['fl_all']}"
        lines.append(f'{kind}: {acc}; {counts}')
        lat = report['latency'].get(kind, {})
        if lat.get('clock_mismatch'):
            lines.append(f"{kind} latency: not measurable ({lat['note']})")
        elif lat.get('count'):
            lines.append(f"{kind} latency ({lat['source']}): p50 {lat.get('p50_ms')} ms, "
                         f"p95 {lat.get('p95_ms')} ms, max {lat.get('max_ms')} ms")
    return '\n'.join(lines)
