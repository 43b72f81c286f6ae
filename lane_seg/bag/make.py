"""
``lane-seg bag make``: record the synthetic drive into a rosbag2 bag, as the CARLA bridge would.

Topics (all ``sensor_msgs``; every message of a frame carries the same header stamp, and the
bag timestamp of each message equals its header stamp):

=====================================  ==============  ======================================
topic                                  encoding        content
=====================================  ==============  ======================================
``/carla/ego_vehicle/rgb_front/image``  ``bgra8``       camera (alpha 255), frame_id
                                                       ``ego_vehicle/rgb_front``
``.../rgb_front/camera_info``          CameraInfo      K/P from the intrinsics, ``plumb_bob``
                                                       with zero distortion, R identity
``/lane_seg/gt/lane_mask``             ``mono8``       255 on lane boundaries, 0 elsewhere
``/lane_seg/gt/lane_ids``              ``mono8``       boundary instance ids 1..N (left
                                                       first), 0 background
``/lane_seg/gt/flow``                  ``32FC2``       flow from frame K-1 to frame K (pixels,
                                                       on frame K-1's grid, NaN where
                                                       invalid), stamped with frame K
``/lane_seg/gt/flow_valid``            ``mono8``       255 where that flow is valid
=====================================  ==============  ======================================

``/lane_seg/gt/flow`` follows lane_seg's flow convention, like ``flow_node``'s ``~/flow`` and
``camera_sim_node``'s: the forward flow from the previous frame to the current one, on the
previous frame's pixel grid, stamped with the current (newer) frame. Frame 0 has no flow
messages, so N frames give N-1 flow pairs.  Stamps start at
:data:`EPOCH_NS` (2023-11-14 22:13:20 UTC) and advance by the drive's frame period (20 Hz by
default, CARLA's ``fixed_delta_seconds`` 0.05); frame K is at ``EPOCH_NS + round(K * 1e9 / fps)``.
"""

import cv2
import numpy as np

from .io import (BagWriter, CAMERA_FRAME_ID, CAMERA_INFO_TOPIC, CAMERA_INFO_TYPE, GT_FLOW_TOPIC,
                 GT_FLOW_VALID_TOPIC, GT_LANE_IDS_TOPIC, GT_LANE_MASK_TOPIC, IMAGE_TOPIC,
                 IMAGE_TYPE, make_header, make_image, typestore)
from ..sim import DriveConfig, SyntheticDrive

EPOCH_NS = 1_700_000_000 * 1_000_000_000

TOPICS = {
    CAMERA_INFO_TOPIC: CAMERA_INFO_TYPE,
    IMAGE_TOPIC: IMAGE_TYPE,
    GT_LANE_MASK_TOPIC: IMAGE_TYPE,
    GT_LANE_IDS_TOPIC: IMAGE_TYPE,
    GT_FLOW_TOPIC: IMAGE_TYPE,
    GT_FLOW_VALID_TOPIC: IMAGE_TYPE,
}

_FROM_BGR = {
    'bgr8': None,
    'bgra8': cv2.COLOR_BGR2BGRA,
    'rgb8': cv2.COLOR_BGR2RGB,
    'rgba8': cv2.COLOR_BGR2RGBA,
    'mono8': cv2.COLOR_BGR2GRAY,
}
CAMERA_ENCODINGS = tuple(_FROM_BGR)


def encode_camera(bgr, encoding):
    """Convert the BGR frame to ``encoding`` (one of :data:`CAMERA_ENCODINGS`)."""
    try:
        code = _FROM_BGR[encoding]
    except KeyError:
        raise ValueError(f'camera encoding {encoding!r} not one of '
                         f'{", ".join(CAMERA_ENCODINGS)}') from None
    return bgr if code is None else cv2.cvtColor(bgr, code)


def frame_stamp_ns(index, fps, start_ns=EPOCH_NS):
    return int(start_ns) + round(index * 1_000_000_000 / fps)


def camera_info(store, intrinsics, stamp, frame_id=CAMERA_FRAME_ID):
    """Make a rosbags ``sensor_msgs/CameraInfo`` of a distortion-free pinhole camera."""
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    roi_cls = store.types['sensor_msgs/msg/RegionOfInterest']
    return store.types[CAMERA_INFO_TYPE](
        header=make_header(store, stamp, frame_id),
        height=int(intrinsics.height), width=int(intrinsics.width),
        distortion_model='plumb_bob', d=np.zeros(5),
        k=np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]),
        r=np.eye(3).reshape(-1),
        p=np.array([fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]),
        binning_x=0, binning_y=0,
        roi=roi_cls(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def drive_messages(frames, seed=0, height=256, width=512, encoding='bgra8', store=None,
                   start_ns=EPOCH_NS, frame_id=CAMERA_FRAME_ID):
    """
    Yield ``(topic, msgtype, rosbags message, stamp_ns)`` for ``frames`` frames of a drive.

    Messages come in time order, per frame in the order of :data:`TOPICS`.  Tests transform
    this stream (change the encoding, drop or repeat frames) before writing it.
    """
    if frames < 1:
        raise ValueError(f'frames={frames} must be >= 1')
    store = store if store is not None else typestore()
    drive = SyntheticDrive(DriveConfig.sized(seed, height, width))
    fps = drive.config.fps
    previous = None
    for frame in drive.frames(frames):
        stamp = frame_stamp_ns(frame.index, fps, start_ns)
        yield CAMERA_INFO_TOPIC, CAMERA_INFO_TYPE, camera_info(
            store, frame.intrinsics, stamp, frame_id), stamp
        yield IMAGE_TOPIC, IMAGE_TYPE, make_image(
            store, encode_camera(frame.image, encoding), encoding, stamp, frame_id), stamp
        lanes = np.where(frame.lane_mask > 0, 255, 0).astype(np.uint8)
        yield GT_LANE_MASK_TOPIC, IMAGE_TYPE, make_image(
            store, lanes, 'mono8', stamp, frame_id), stamp
        yield GT_LANE_IDS_TOPIC, IMAGE_TYPE, make_image(
            store, frame.lane_mask, 'mono8', stamp, frame_id), stamp
        if previous is not None:   # the flow K-1 -> K goes out with frame K
            flow = np.where(previous.flow_valid[..., None], previous.flow, np.nan)
            yield GT_FLOW_TOPIC, IMAGE_TYPE, make_image(
                store, flow.astype(np.float32), '32FC2', stamp, frame_id), stamp
            valid = np.where(previous.flow_valid, 255, 0).astype(np.uint8)
            yield GT_FLOW_VALID_TOPIC, IMAGE_TYPE, make_image(
                store, valid, 'mono8', stamp, frame_id), stamp
        previous = frame


def write_messages(out, messages, storage='mcap', custom_data=None, store=None):
    """Write ``(topic, msgtype, msg_or_bytes, stamp_ns)`` tuples (bytes are written raw)."""
    store = store if store is not None else typestore()
    with BagWriter(out, storage=storage, store=store, custom_data=custom_data) as bag:
        for topic, msgtype, msg, stamp in messages:
            bag.add_topic(topic, msgtype)
            if isinstance(msg, (bytes, bytearray, memoryview)):
                bag.write_raw(topic, msg, stamp)
            else:
                bag.write(topic, msg, stamp)
        return dict(bag.counts)


def make_bag(out, frames=20, seed=0, storage='mcap', height=256, width=512, encoding='bgra8',
             progress=False):
    """Record ``frames`` frames of the synthetic drive ``seed`` into a new bag at ``out``."""
    store = typestore()
    fps = DriveConfig.sized(seed, height, width).fps
    custom = {'lane_seg.generator': 'lane-seg bag make', 'lane_seg.seed': seed,
              'lane_seg.frames': frames, 'lane_seg.size': f'{height}x{width}',
              'lane_seg.fps': fps,
              'lane_seg.flow': 'gt/flow at stamp K: frame K-1 -> K, on frame K-1 pixels, '
                               'NaN where invalid'}
    messages = drive_messages(frames, seed, height, width, encoding, store)
    if progress:
        from tqdm import tqdm
        messages = tqdm(messages, total=frames * len(TOPICS) - 2, desc='bag make',
                        unit='msg')
    counts = write_messages(out, messages, storage, custom, store)
    return {'bag': str(out), 'storage': storage, 'frames': frames, 'seed': seed,
            'size': f'{height}x{width}', 'fps': fps, 'encoding': encoding,
            'start_ns': EPOCH_NS, 'topics': counts}
