"""
rosbag2 make / read / play / record / eval, in both storage formats, with real rclpy.

Bags are tiny (24x48 to 32x64 pixels, a handful of frames) and written into ``tmp_path``.
rclpy runs in this process in its own context on a domain id of its own (subprocesses get it
through ``ROS_DOMAIN_ID``), so these tests neither see nor disturb other modules' graphs.
"""

import json
import os
from pathlib import Path
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import cv2
from lane_seg.bag.convert import MessageConverter, UnknownTypeError
from lane_seg.bag.eval import (evaluate_bag, flow_runner, format_report, lane_runner,
                               PipelineUnavailableError, replay)
from lane_seg.bag.io import (BAG_VERSION, BagError, BagReader, BagWriter, CAMERA_INFO_TOPIC,
                             DecodeError, GT_FLOW_TOPIC, GT_FLOW_VALID_TOPIC, GT_LANE_IDS_TOPIC,
                             GT_LANE_MASK_TOPIC, IMAGE_TOPIC, make_header, make_image,
                             register_msgdef, typestore)
from lane_seg.bag.make import drive_messages, EPOCH_NS, make_bag, write_messages
from lane_seg.bag.play import BagPlayer, PlayOptions
from lane_seg.bag.record import BagRecorder, msgdef_from_rclpy, record
from lane_seg.image_conversion import image_to_numpy
from lane_seg.sim import DriveConfig, SyntheticDrive
import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from rosbags.typesys import get_typestore, Stores
import yaml

# A domain of this module's own (0-101 is the range safe on Linux), below the 60+ that other
# modules use; rclpy gets it per context, subprocesses through their environment.
DOMAIN_ID = 10 + os.getpid() % 50

STORAGES = ('mcap', 'sqlite3')
FRAMES, SEED, H, W = 6, 4, 32, 64
PERIOD_NS = 50_000_000          # 20 Hz
MASK_OUT, FLOW_OUT = '/lane_seg_node/mask', '/flow_node/flow'
WIDGET = 'acme_msgs/msg/Widget'
LANE_SEG = Path(sys.executable).parent / 'lane-seg'


def _cli(*args, env=None):
    cmd = [str(LANE_SEG)] if LANE_SEG.exists() else [sys.executable, '-m', 'lane_seg.cli']
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120, env=env)


def _stamp(msg):
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.fixture(scope='module')
def frames():
    return list(SyntheticDrive(DriveConfig.sized(SEED, H, W)).frames(FRAMES))


@pytest.fixture(scope='module')
def drive_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('drive')
    return {s: make_bag(root / s, frames=FRAMES, seed=SEED, storage=s, height=H,
                        width=W)['bag'] for s in STORAGES}


@pytest.fixture(scope='module')
def ros():
    import rclpy
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    yield context
    rclpy.try_shutdown(context=context)


# ------------------------------------------------------------------------------- make / read


@pytest.mark.parametrize('storage', STORAGES)
def test_made_bag_reads_back_with_rosbags(drive_bags, frames, storage):
    path = Path(drive_bags[storage])
    meta = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['version'] == BAG_VERSION and meta['storage_identifier'] == storage
    qos = yaml.safe_load(meta['topics_with_message_count'][0]['topic_metadata'][
        'offered_qos_profiles'])
    assert qos[0]['reliability'] == 1 and qos[0]['depth'] == 10   # integer enums: Humble too
    store = typestore()
    with Reader(path) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        types = {c.topic: c.msgtype for c in reader.connections}
        assert counts == {CAMERA_INFO_TOPIC: FRAMES, IMAGE_TOPIC: FRAMES,
                          GT_LANE_MASK_TOPIC: FRAMES, GT_LANE_IDS_TOPIC: FRAMES,
                          GT_FLOW_TOPIC: FRAMES - 1, GT_FLOW_VALID_TOPIC: FRAMES - 1}
        assert types[CAMERA_INFO_TOPIC] == 'sensor_msgs/msg/CameraInfo'
        assert {types[t] for t in counts if t != CAMERA_INFO_TOPIC} == {'sensor_msgs/msg/Image'}
        seen = {}
        for conn, timestamp, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            assert _stamp(msg) == timestamp                     # bag time = header stamp
            index = (timestamp - EPOCH_NS) // PERIOD_NS
            assert timestamp == EPOCH_NS + index * PERIOD_NS
            assert msg.header.frame_id == 'ego_vehicle/rgb_front'
            seen.setdefault(conn.topic, []).append(index)
            frame = frames[index]
            if conn.topic == IMAGE_TOPIC:
                assert msg.encoding == 'bgra8'
                bgra = image_to_numpy(msg)
                assert np.array_equal(bgra[..., :3], frame.image) and (bgra[..., 3] == 255).all()
            elif conn.topic == GT_LANE_MASK_TOPIC:
                assert np.array_equal(image_to_numpy(msg), np.where(frame.lane_mask > 0, 255, 0))
            elif conn.topic == GT_LANE_IDS_TOPIC:
                assert np.array_equal(image_to_numpy(msg), frame.lane_mask)
            elif conn.topic == GT_FLOW_TOPIC:       # flow K-1 -> K at stamp K, NaN if invalid
                assert msg.encoding == '32FC2'
                before = frames[index - 1]
                expected = np.where(before.flow_valid[..., None], before.flow, np.nan)
                assert np.array_equal(image_to_numpy(msg), expected, equal_nan=True)
            elif conn.topic == GT_FLOW_VALID_TOPIC:
                assert np.array_equal(image_to_numpy(msg) > 0, frames[index - 1].flow_valid)
            else:
                k = frame.intrinsics
                assert (msg.width, msg.height, msg.distortion_model) == (W, H, 'plumb_bob')
                assert list(msg.k) == [k.fx, 0, k.cx, 0, k.fy, k.cy, 0, 0, 1]
                assert list(msg.p) == [k.fx, 0, k.cx, 0, 0, k.fy, k.cy, 0, 0, 0, 1, 0]
                assert not np.any(msg.d)
    assert seen[IMAGE_TOPIC] == list(range(FRAMES))
    assert seen[GT_FLOW_TOPIC] == list(range(1, FRAMES))


def test_written_types_hash_the_same_from_humble_to_kilted_and_from_rclpy():
    stores = [get_typestore(s) for s in (Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY,
                                         Stores.ROS2_KILTED)]
    converter = MessageConverter()
    for msgtype in ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CameraInfo',
                    'rosgraph_msgs/msg/Clock', 'diagnostic_msgs/msg/DiagnosticArray',
                    'std_msgs/msg/String'):
        hashes = {s.hash_rihs01(msgtype) for s in stores}
        assert len(hashes) == 1, msgtype
        empty = get_typestore(Stores.EMPTY)
        register_msgdef(empty, msgtype,
                        msgdef_from_rclpy(converter.rclpy_class(msgtype), msgtype))
        assert empty.hash_rihs01(msgtype) == hashes.pop(), msgtype


def test_converter_equals_rclpy_deserialization(drive_bags):
    from rclpy.serialization import deserialize_message
    converter = MessageConverter()
    store = typestore()
    with BagReader(drive_bags['mcap']) as bag:
        items = [(m.msgtype, bytes(m.data)) for m in bag.messages()]
    t = store.types
    kv = t['diagnostic_msgs/msg/KeyValue'](key='end_to_end_ms.p95', value='4.5')
    status = t['diagnostic_msgs/msg/DiagnosticStatus'](level=1, name='n', message='m',
                                                       hardware_id='h', values=[kv])
    extra = [('diagnostic_msgs/msg/DiagnosticArray', t['diagnostic_msgs/msg/DiagnosticArray'](
                 header=make_header(store, 5, 'x'), status=[status])),
             ('std_msgs/msg/Byte', t['std_msgs/msg/Byte'](data=7)),
             ('std_msgs/msg/Char', t['std_msgs/msg/Char'](data=65)),
             ('std_msgs/msg/Float32MultiArray', t['std_msgs/msg/Float32MultiArray'](
                 layout=t['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
                 data=np.array([1.5, -2.0], np.float32)))]
    items += [(name, bytes(store.serialize_cdr(msg, name))) for name, msg in extra]
    for msgtype, raw in items:
        converted = converter.convert(store.deserialize_cdr(raw, msgtype), msgtype)
        assert converted == deserialize_message(raw, converter.rclpy_class(msgtype)), msgtype
    with pytest.raises(UnknownTypeError, match='acme_msgs'):
        converter.rclpy_class(WIDGET)


# ------------------------------------------------------------------------------- bad bags


def _nasty_messages(store):
    """
    Six frames with everything wrong a replay meets, then frames 0-2 again (a loop).

    Frame 2's image is truncated CDR, frames 3-5 switch the camera to rgb8, an unknown
    ``acme_msgs/Widget`` topic rides along, and the loop's stamps jump back.
    """
    register_msgdef(store, WIDGET, 'int32 a\nstring b\n')
    widget = store.types[WIDGET]
    messages = list(drive_messages(FRAMES, SEED, 24, 48, store=store))
    out = []
    for topic, msgtype, msg, stamp in messages:
        index = (stamp - EPOCH_NS) // PERIOD_NS
        if topic == IMAGE_TOPIC and index >= 3:
            rgb = cv2.cvtColor(np.ascontiguousarray(image_to_numpy(msg)), cv2.COLOR_BGRA2RGB)
            msg = make_image(store, rgb, 'rgb8', stamp, msg.header.frame_id)
        if topic == IMAGE_TOPIC and index == 2:
            raw = bytes(store.serialize_cdr(msg, msgtype))
            msg = raw[:len(raw) // 2]
        out.append((topic, msgtype, msg, stamp))
        if topic == CAMERA_INFO_TOPIC:
            out.append(('/acme/widget', WIDGET, widget(a=int(index), b='w'), stamp))
    last = out[-1][3]
    loop = [(t, ty, m, last + PERIOD_NS + s - EPOCH_NS) for t, ty, m, s in out
            if s < EPOCH_NS + 3 * PERIOD_NS]
    return out + loop


@pytest.fixture(scope='module')
def nasty_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('nasty')
    bags = {}
    for storage in STORAGES:
        store = typestore()
        write_messages(root / storage, _nasty_messages(store), storage, store=store)
        bags[storage] = root / storage
    return bags


@pytest.mark.parametrize('storage', STORAGES)
def test_reader_counts_corrupt_messages_and_decodes_the_rest(nasty_bags, storage):
    with BagReader(nasty_bags[storage]) as bag:
        assert bag.topics['/acme/widget'].msgtype == WIDGET
        good, bad, encodings, widgets = 0, [], [], []
        for m in bag.messages([IMAGE_TOPIC, '/acme/widget']):
            try:
                msg = bag.decode(m)
            except DecodeError as exc:
                bad.append(str(exc))
                continue
            good += 1
            if m.topic == IMAGE_TOPIC:
                encodings.append(msg.encoding)
            else:
                widgets.append(msg.a)   # unknown to the typestore: decoded from the bag
        assert len(bad) == 2 and IMAGE_TOPIC in bad[0] and 'sensor_msgs/msg/Image' in bad[0]
        assert encodings == ['bgra8', 'bgra8', 'rgb8', 'rgb8', 'rgb8', 'bgra8', 'bgra8']
        assert widgets == [0, 1, 2, 3, 4, 5, 0, 1, 2]
        assert good == len(encodings) + len(widgets) and bag.integrity() == {}


def test_truncated_mcap_is_salvaged_up_to_the_cut(drive_bags, tmp_path):
    path = tmp_path / 'cut'
    shutil.copytree(drive_bags['mcap'], path)
    (mcap,) = path.glob('*.mcap')
    data = mcap.read_bytes()
    mcap.write_bytes(data[:int(len(data) * 0.6)])
    with BagReader(path) as bag:
        assert bag.salvaged and any('salvaging' in w for w in bag.warnings)
        stamps = [bag.decode(m).header.stamp.sec for m in bag.messages()]
        missing = bag.integrity()
    assert 0 < len(stamps) < 4 * FRAMES + 2 * (FRAMES - 1)
    assert missing and all(v['read'] < v['expected'] for v in missing.values())
    (path / 'metadata.yaml').unlink()          # a recorder killed before writing it
    with BagReader(path) as bag:
        assert len(list(bag.messages())) == len(stamps)


def test_sqlite_rows_deleted_are_reported_and_a_cut_db_is_a_clear_error(drive_bags, tmp_path):
    path = tmp_path / 'rows'
    shutil.copytree(drive_bags['sqlite3'], path)
    (db,) = path.glob('*.db3')
    con = sqlite3.connect(db)
    con.execute('DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE topic_id = '
                '(SELECT id FROM topics WHERE name = ?) LIMIT 2)', (GT_LANE_MASK_TOPIC,))
    con.commit()
    con.close()
    with BagReader(path) as bag:
        assert sum(1 for _ in bag.messages()) == 4 * FRAMES + 2 * (FRAMES - 1) - 2
        assert bag.integrity() == {GT_LANE_MASK_TOPIC: {'expected': FRAMES, 'read': FRAMES - 2}}
    report = evaluate_bag(path, _outputs_bag(tmp_path / 'out', drive_bags['sqlite3']))
    assert report['mask']['missing'] == 0 and report['mask']['unmatched'] == 2
    cut = tmp_path / 'cut'
    shutil.copytree(drive_bags['sqlite3'], cut)
    (db,) = cut.glob('*.db3')
    db.write_bytes(db.read_bytes()[:db.stat().st_size // 2 + 100])
    with pytest.raises(BagError, match='sqlite3'):
        BagReader(cut)
    proc = _cli('bag', 'info', cut)
    assert proc.returncode == 2 and 'lane-seg: error:' in proc.stderr
    assert 'Traceback' not in proc.stderr


# ------------------------------------------------------------------------------- rclpy


class _Collector:
    """A subscriber node that timestamps everything it receives."""

    count = 0

    def __init__(self, context, topics):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        _Collector.count += 1
        self.node = rclpy.create_node(f'collector_{_Collector.count}', context=context)
        self.got = {topic: [] for topic in topics}
        for topic, cls in topics.items():
            self.node.create_subscription(
                cls, topic, lambda msg, t=topic: self.got[t].append((time.monotonic(), msg)),
                QoSProfile(depth=200))
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def spin_while(self, thread, settle=0.3, timeout=20.0):
        end = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.002)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.01)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


def _play_in_thread(context, path, options):
    import rclpy
    node = rclpy.create_node('player', context=context)
    result = {}
    thread = threading.Thread(target=lambda: result.update(BagPlayer(node, path, options).run()))
    thread.start()
    return thread, result, node


@pytest.mark.ros
@pytest.mark.parametrize('storage', STORAGES)
def test_play_delivers_every_message_with_stamps_timing_and_clock(ros, drive_bags, storage):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image
    rate = 2.0
    sub = _Collector(ros, {IMAGE_TOPIC: Image, CAMERA_INFO_TOPIC: CameraInfo,
                           GT_FLOW_TOPIC: Image, '/clock': Clock})
    thread, stats, node = _play_in_thread(ros, drive_bags[storage], PlayOptions(
        rate=rate, clock=True, clock_hz=100.0, wait_for_subscribers=5.0,
        wait_topics=(IMAGE_TOPIC, CAMERA_INFO_TOPIC, GT_FLOW_TOPIC)))
    sub.spin_while(thread)
    node.destroy_node()
    sub.close()
    images = sub.got[IMAGE_TOPIC]
    expected = [EPOCH_NS + i * PERIOD_NS for i in range(FRAMES)]
    assert [_stamp(m) for _, m in images] == expected
    assert [_stamp(m) for _, m in sub.got[CAMERA_INFO_TOPIC]] == expected
    assert [_stamp(m) for _, m in sub.got[GT_FLOW_TOPIC]] == expected[1:]
    assert images[0][1].encoding == 'bgra8' and images[0][1].width == W
    arrivals = [t for t, _ in images]
    print('image arrivals (ms):', [round((t - arrivals[0]) * 1e3, 1) for t in arrivals])
    span = arrivals[-1] - arrivals[1]     # the first sample of a new match may come late
    nominal = (FRAMES - 2) * PERIOD_NS / 1e9 / rate
    assert 0.6 * nominal <= span <= nominal + 0.5, (span, nominal)
    clocks = [m.clock.sec * 1_000_000_000 + m.clock.nanosec for _, m in sub.got['/clock']]
    assert len(clocks) >= 4 * FRAMES and clocks == sorted(clocks)
    assert clocks[0] == EPOCH_NS and clocks[-1] == expected[-1]
    assert stats['published'][IMAGE_TOPIC] == FRAMES and stats['passes'] == 1
    assert stats['decode_errors'] == 0 and stats['skipped_unknown_type'] == {}


@pytest.mark.ros
@pytest.mark.parametrize('storage', STORAGES)
def test_play_survives_a_bad_bag_and_delivers_everything_valid(ros, nasty_bags, storage):
    from sensor_msgs.msg import Image
    sub = _Collector(ros, {IMAGE_TOPIC: Image, GT_LANE_MASK_TOPIC: Image})
    thread, stats, node = _play_in_thread(ros, nasty_bags[storage], PlayOptions(
        rate=5.0, loops=2, wait_for_subscribers=5.0, wait_topics=(IMAGE_TOPIC,)))
    sub.spin_while(thread)
    node.destroy_node()
    sub.close()
    frames = [0, 1, 3, 4, 5, 0, 1] * 2              # frame 2's image is corrupt, twice
    assert [(_stamp(m) - EPOCH_NS) // PERIOD_NS for _, m in sub.got[IMAGE_TOPIC]] == frames
    assert [m.encoding for _, m in sub.got[IMAGE_TOPIC]][:7] == ['bgra8'] * 2 + ['rgb8'] * 3 \
        + ['bgra8'] * 2
    assert len(sub.got[GT_LANE_MASK_TOPIC]) == 2 * (FRAMES + 3)
    assert stats['passes'] == 2 and stats['decode_errors'] == 4
    assert stats['skipped_unknown_type'] == {WIDGET: 2 * (FRAMES + 3)}
    assert stats['stamp_jumps_back'] > 0


@pytest.mark.ros
def test_play_of_a_truncated_mcap_publishes_what_was_salvaged(ros, drive_bags, tmp_path):
    from sensor_msgs.msg import Image
    path = tmp_path / 'cut'
    shutil.copytree(drive_bags['mcap'], path)
    (mcap,) = path.glob('*.mcap')
    data = mcap.read_bytes()
    mcap.write_bytes(data[:int(len(data) * 0.7)])
    with BagReader(path) as bag:
        readable = sum(1 for _ in bag.messages([IMAGE_TOPIC]))
    sub = _Collector(ros, {IMAGE_TOPIC: Image})
    thread, stats, node = _play_in_thread(ros, path, PlayOptions(
        rate=5.0, wait_for_subscribers=5.0, wait_topics=(IMAGE_TOPIC,)))
    sub.spin_while(thread)
    node.destroy_node()
    sub.close()
    assert 0 < readable < FRAMES and len(sub.got[IMAGE_TOPIC]) == readable
    assert stats['missing_in_storage'][IMAGE_TOPIC] == {'expected': FRAMES, 'read': readable}
    assert any('salvaging' in w for w in stats['warnings'])


def _spin_until(executor, condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.01)
    return condition()


@pytest.mark.ros
@pytest.mark.parametrize('storage', STORAGES)
def test_record_writes_what_a_publisher_sends(ros, tmp_path, storage):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from lane_seg.image_conversion import numpy_to_image
    pub_node = rclpy.create_node('rec_publisher', context=ros)
    rec_node = rclpy.create_node('rec_recorder', context=ros)
    executor = SingleThreadedExecutor(context=ros)
    executor.add_node(pub_node)
    executor.add_node(rec_node)
    images = pub_node.create_publisher(Image, '/rec_test/image', 10)
    texts = pub_node.create_publisher(String, '/rec_test/text', 10)
    recorder = BagRecorder(rec_node, tmp_path / 'rec', ['/rec_test/image', 'rec_test/text',
                                                        '/rec_test/never'], storage=storage)
    recorder.start()
    assert _spin_until(executor, lambda: images.get_subscription_count() > 0
                       and texts.get_subscription_count() > 0)
    arrays = [np.full((4, 6), i, np.uint8) for i in range(5)]
    begin = time.time_ns()
    for i, arr in enumerate(arrays):
        msg = numpy_to_image(arr, 'mono8')
        msg.header.stamp.sec, msg.header.frame_id = 100 + i, 'cam'
        images.publish(msg)
        texts.publish(String(data=f'text {i}'))
    assert _spin_until(executor, lambda: recorder.stats['recorded'] == {
        '/rec_test/image': 5, '/rec_test/text': 5})
    stats = recorder.stop()
    announced = pub_node.get_publishers_info_by_topic('/rec_test/image')[0].topic_type_hash
    executor.shutdown()
    pub_node.destroy_node()
    rec_node.destroy_node()
    assert stats['waiting_for'] == ['/rec_test/never']
    store = typestore()
    with Reader(tmp_path / 'rec') as reader:
        conns = {c.topic: c for c in reader.connections}
        assert conns['/rec_test/image'].msgtype == 'sensor_msgs/msg/Image'
        assert conns['/rec_test/image'].digest == 'RIHS01_' + bytes(announced.value).hex()
        assert conns['/rec_test/text'].msgtype == 'std_msgs/msg/String'
        got = {}
        for conn, timestamp, raw in reader.messages():
            assert begin <= timestamp <= time.time_ns()       # receive time
            got.setdefault(conn.topic, []).append(store.deserialize_cdr(raw, conn.msgtype))
    assert [m.header.stamp.sec for m in got['/rec_test/image']] == list(range(100, 105))
    assert all(np.array_equal(image_to_numpy(m), a)
               for m, a in zip(got['/rec_test/image'], arrays))
    assert [m.data for m in got['/rec_test/text']] == [f'text {i}' for i in range(5)]


@pytest.mark.ros
def test_record_with_explicit_types_before_the_publisher_exists(ros, tmp_path):
    import rclpy
    from std_msgs.msg import String
    result = {}
    thread = threading.Thread(target=lambda: result.update(record(
        tmp_path / 'early', ['/early/text'], types=['std_msgs/msg/String'], duration=15,
        max_messages=3, node_name='early_recorder', context=ros)))
    thread.start()
    node = rclpy.create_node('late_publisher', context=ros)
    pub = node.create_publisher(String, '/early/text', 10)
    end = time.monotonic() + 10
    while pub.get_subscription_count() == 0 and time.monotonic() < end:
        time.sleep(0.01)
    for i in range(3):
        pub.publish(String(data=str(i)))
    thread.join(20)
    node.destroy_node()
    assert result['recorded'] == {'/early/text': 3}
    with BagReader(tmp_path / 'early') as bag:
        assert [bag.decode(m).data for m in bag.messages()] == ['0', '1', '2']


@pytest.mark.ros
def test_cli_play_publishes_with_clock(ros, drive_bags):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    sub = _Collector(ros, {'/replayed/image': Image, '/clock': Clock})
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    result = {}
    thread = threading.Thread(target=lambda: result.update(proc=_cli(
        'bag', 'play', drive_bags['sqlite3'], '--rate', '4', '--clock', '--topics', IMAGE_TOPIC,
        '--remap', f'{IMAGE_TOPIC}:=/replayed/image', '--wait-for', '/replayed/image',
        '--wait-for-subscribers', '10', '--wait-for-all-acked', '5', env=env)))
    thread.start()
    sub.spin_while(thread, timeout=60)
    sub.close()
    proc = result['proc']
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats['published'] == {IMAGE_TOPIC: FRAMES}
    assert [_stamp(m) for _, m in sub.got['/replayed/image']] == [
        EPOCH_NS + i * PERIOD_NS for i in range(FRAMES)]
    assert sub.got['/clock']


# ------------------------------------------------------------------------------- eval


def _outputs_bag(path, truth, latency_ms=7.0, drop=(), duplicate=(), extra=False,
                 wrong_size=(), diagnostics=False, storage='mcap'):
    """Write the truth of ``truth`` back as node outputs, received ``latency_ms`` later."""
    store = typestore()
    with BagReader(truth) as src, BagWriter(path, storage=storage, store=store) as out:
        out.add_topic(MASK_OUT, 'sensor_msgs/msg/Image')
        out.add_topic(FLOW_OUT, 'sensor_msgs/msg/Image')
        for m in src.messages([GT_LANE_MASK_TOPIC, GT_FLOW_TOPIC]):
            msg = src.decode(m)
            stamp = _stamp(msg)
            index = (stamp - EPOCH_NS) // PERIOD_NS
            topic = MASK_OUT if m.topic == GT_LANE_MASK_TOPIC else FLOW_OUT
            if (topic, index) in drop:
                continue
            if (topic, index) in wrong_size:
                arr = np.ascontiguousarray(image_to_numpy(msg)[:-1])
                msg = make_image(store, arr, msg.encoding, stamp, msg.header.frame_id)
            received = stamp + int(latency_ms * 1e6)
            for _ in range(2 if (topic, index) in duplicate else 1):
                out.write(topic, msg, received)
            if extra and topic == MASK_OUT and index == 0:
                out.write(topic, make_image(store, image_to_numpy(msg), 'mono8', stamp + 1,
                                            'x'), received)
        if diagnostics:
            t = store.types
            out.add_topic('/diagnostics', 'diagnostic_msgs/msg/DiagnosticArray')
            kv = t['diagnostic_msgs/msg/KeyValue']
            status = t['diagnostic_msgs/msg/DiagnosticStatus'](
                level=0, name='lane_seg_node: latency', message='ok', hardware_id='',
                values=[kv(key='end_to_end_ms.p95', value='12.5'),
                        kv(key='input_rate_hz', value='20')])
            out.write('/diagnostics', t['diagnostic_msgs/msg/DiagnosticArray'](
                header=make_header(store, EPOCH_NS, ''), status=[status]), EPOCH_NS)
    return path


@pytest.mark.parametrize('storage', STORAGES)
def test_eval_of_the_truth_itself_is_perfect_with_exact_counts(drive_bags, tmp_path, storage):
    out = _outputs_bag(tmp_path / 'out', drive_bags[storage], diagnostics=True,
                       storage=storage)
    report = evaluate_bag(drive_bags[storage], out)
    mask, flow = report['mask'], report['flow']
    assert mask['iou'] == 1.0 and mask['iou_pooled'] == 1.0 and mask['f1'] == 1.0
    assert flow['epe'] == 0.0 and flow['epe_pixels'] == 0.0 and flow['fl_all'] == 0.0
    for result, n in ((mask, FRAMES), (flow, FRAMES - 1)):
        assert {k: result[k] for k in ('inputs', 'outputs', 'matched', 'missing', 'duplicates',
                                       'unmatched', 'rejected', 'scored')} == {
            'inputs': n, 'outputs': n, 'matched': n, 'missing': 0, 'duplicates': 0,
            'unmatched': 0, 'rejected': 0, 'scored': n}
    latency = report['latency']
    assert latency['mask']['source'] == 'receive_time' and latency['mask']['p50_ms'] == 7.0
    assert latency['flow']['p95_ms'] == 7.0
    assert latency['diagnostics']['values'] == {
        'lane_seg_node: latency': {'end_to_end_ms.p95': 12.5}}
    assert 'IoU 1.0' in format_report(report)
    json.dumps(report, allow_nan=False)


def test_eval_counts_missing_duplicate_unmatched_and_rejected(drive_bags, tmp_path):
    out = _outputs_bag(tmp_path / 'out', drive_bags['mcap'], drop={(MASK_OUT, 3)},
                       duplicate={(FLOW_OUT, 2)}, extra=True, wrong_size={(MASK_OUT, 1)},
                       latency_ms=9e10)   # a recorder on the wall clock, years later
    report = evaluate_bag(drive_bags['mcap'], out)
    mask, flow = report['mask'], report['flow']
    assert mask['missing'] == 1 and mask['missing_stamps'] == [EPOCH_NS + 3 * PERIOD_NS]
    assert mask['unmatched'] == 1 and mask['rejected'] == 1 and mask['scored'] == FRAMES - 2
    assert mask['matched'] == FRAMES - 1 and mask['iou'] == 1.0
    assert flow['duplicates'] == 1 and flow['matched'] == FRAMES - 1 and flow['missing'] == 0
    assert report['latency']['mask']['clock_mismatch'] is True


def test_eval_of_a_bad_bag_counts_and_matches_a_looped_drive(nasty_bags, tmp_path):
    report = evaluate_bag(nasty_bags['mcap'], _outputs_bag(tmp_path / 'out',
                                                           nasty_bags['mcap']))
    mask = report['mask']
    assert mask['inputs'] == FRAMES + 3 and mask['matched'] == FRAMES + 3
    assert mask['input_stamp_repeats'] == 3 and mask['input_stamp_jumps_back'] == 1
    assert mask['iou'] == 1.0 and report['flow']['epe'] == 0.0
    assert report['flow']['missing'] == 0


def _camera_sim_bag(path, frames, store, older=False):
    """Camera and truth as recorded from ``camera_sim_node`` (``older``: flow K -> K+1 at K)."""
    messages = []
    for f in frames:
        stamp = EPOCH_NS + f.index * PERIOD_NS
        messages.append((IMAGE_TOPIC, 'sensor_msgs/msg/Image',
                         make_image(store, f.image, 'bgr8', stamp, 'cam'), stamp))
        messages.append(('/camera_sim_node/lane_mask', 'sensor_msgs/msg/Image', make_image(
            store, np.where(f.lane_mask > 0, 255, 0).astype(np.uint8), 'mono8', stamp, 'cam'),
            stamp))
        pair = f if older else (frames[f.index - 1] if f.index else None)
        if pair is not None:
            nan_flow = np.where(pair.flow_valid[..., None], pair.flow, np.nan)
            messages.append(('/camera_sim_node/flow', 'sensor_msgs/msg/Image', make_image(
                store, nan_flow.astype(np.float32), '32FC2', stamp, 'cam'), stamp))
    write_messages(path, messages, 'mcap', store=store)
    return path


def _flow_node_bag(path, frames, store):
    """flow_node's output: frame K-1 -> K stamped with frame K, no NaN."""
    outputs = [(FLOW_OUT, 'sensor_msgs/msg/Image', make_image(
        store, frames[f.index - 1].flow, '32FC2', EPOCH_NS + f.index * PERIOD_NS, 'cam'),
        EPOCH_NS + f.index * PERIOD_NS) for f in frames[1:]]
    write_messages(path, outputs, 'mcap', store=store)
    return path


def test_eval_reads_camera_sim_node_truth_stamped_with_the_newer_frame(frames, tmp_path):
    store = typestore()
    truth = _camera_sim_bag(tmp_path / 'in', frames, store)
    outputs = _flow_node_bag(tmp_path / 'out', frames, store)
    report = evaluate_bag(truth, outputs)
    assert report['ground_truth']['flow'] == '/camera_sim_node/flow'
    assert report['ground_truth']['flow_stamp'] == 'newer' and report['mask'] is None
    flow = report['flow']
    assert flow['inputs'] == FRAMES - 1 and flow['matched'] == FRAMES - 1
    assert flow['missing'] == 0 and flow['unmatched'] == 0 and flow['epe'] == 0.0
    # Read as stamped with the older frame, every pair is off by one frame.
    shifted = evaluate_bag(truth, outputs, gt_flow_stamp='older')['flow']
    assert shifted['matched'] == FRAMES - 2 and shifted['epe'] > 0.0


def test_eval_reads_truth_stamped_with_the_older_frame_when_told(frames, tmp_path):
    """Bags from sources that stamp the truth of K -> K+1 with frame K: --gt-flow-stamp older."""
    store = typestore()
    truth = _camera_sim_bag(tmp_path / 'in', frames, store, older=True)
    outputs = _flow_node_bag(tmp_path / 'out', frames, store)
    report = evaluate_bag(truth, outputs, gt_flow_stamp='older')
    assert report['ground_truth']['flow_stamp'] == 'older'
    flow = report['flow']
    assert flow['inputs'] == FRAMES - 1 and flow['matched'] == FRAMES - 1
    assert flow['missing'] == 0 and flow['epe'] == 0.0
    assert evaluate_bag(truth, outputs)['ground_truth']['flow_stamp'] == 'newer'   # default


class _FakeLanes:
    """Stands in for LanePipeline: thresholds nothing, just replays the truth by image."""

    def __init__(self, truth):
        self.truth = truth
        self.encodings = []

    def __call__(self, image, encoding):
        self.encodings.append(encoding)
        key = np.ascontiguousarray(image[..., :3]).tobytes()[:64]
        return type('Result', (), {'mask': self.truth[key]})


def test_eval_run_pipeline_path_with_stand_in_pipelines(tmp_path):
    store = typestore()
    drive = list(SyntheticDrive(DriveConfig.sized(SEED, 24, 48)).frames(4))
    bag = tmp_path / 'in'
    messages = list(drive_messages(4, SEED, 24, 48, store=store))
    messages = [(t, ty, make_image(store, cv2.cvtColor(f.image, cv2.COLOR_BGR2RGB), 'rgb8', s,
                                   'cam') if t == IMAGE_TOPIC and f.index == 3 else m, s)
                for (t, ty, m, s), f in zip(messages, _frame_of(messages, drive))]
    write_messages(bag, messages, 'sqlite3', store=store)
    truth = {}
    for f in drive:
        truth[np.ascontiguousarray(f.image).tobytes()[:64]] = np.where(f.lane_mask > 0, 255, 0)
        rgb = cv2.cvtColor(f.image, cv2.COLOR_BGR2RGB)
        truth[np.ascontiguousarray(rgb).tobytes()[:64]] = np.where(f.lane_mask > 0, 255, 0)
    lanes = _FakeLanes(truth)
    flows = iter([None] + [f.flow for f in drive[:-1]])
    report = evaluate_bag(bag, run_pipeline=True,
                          pipelines=(lanes, lambda image, encoding, stamp_s: next(flows)))
    assert report['mode'] == 'pipeline' and lanes.encodings == ['bgra8'] * 3 + ['rgb8']
    assert report['mask']['iou'] == 1.0 and report['mask']['matched'] == 4
    assert report['flow']['epe'] == 0.0 and report['flow']['matched'] == 3
    assert report['latency']['mask']['source'] == 'pipeline'
    assert report['latency']['mask']['count'] == 4


def test_replay_feeds_every_camera_frame_like_bag_eval(tmp_path):
    drive = list(SyntheticDrive(DriveConfig.sized(SEED, 24, 48)).frames(4))
    bag = tmp_path / 'in'
    make_bag(bag, frames=4, seed=SEED, height=24, width=48)
    truth = {np.ascontiguousarray(f.image).tobytes()[:64]: np.where(f.lane_mask > 0, 255, 0)
             for f in drive}
    masks = replay(bag, lane_runner(_FakeLanes(truth)))
    stamps = sorted(masks)
    assert stamps == [EPOCH_NS + i * PERIOD_NS for i in range(4)]
    for stamp, f in zip(stamps, drive):
        np.testing.assert_array_equal(masks[stamp], np.where(f.lane_mask > 0, 255, 0))

    class Flow:

        def __init__(self):
            self.resets, self.prev = [], None

        def reset(self, reason):
            self.resets.append(reason)

        def __call__(self, image, encoding, stamp_s):
            prev, self.prev = self.prev, stamp_s
            return None if prev is None else np.full((24, 48, 2), stamp_s - prev, np.float32)

    fp = Flow()
    flows = replay(bag, flow_runner(fp))
    assert fp.resets == ['bag eval start'] and sorted(flows) == stamps[1:]
    assert all(np.allclose(v, PERIOD_NS / 1e9) for v in flows.values())

    def broken(image, encoding, stamp_s):
        raise ValueError('no lanes today')
    with pytest.raises(ValueError, match='4 frames could not be used.*no lanes today'):
        replay(bag, broken)


def _frame_of(messages, drive):
    return [drive[(s - EPOCH_NS) // PERIOD_NS] for _, _, _, s in messages]


def _pipeline_importable():
    try:
        import lane_seg.pipeline.flow  # noqa: F401
        import lane_seg.pipeline.lanes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_pipeline_importable(), reason='the pipeline module exists')
def test_run_pipeline_without_the_module_is_a_clear_error(drive_bags):
    with pytest.raises(PipelineUnavailableError, match='lane_seg.pipeline.lanes'):
        evaluate_bag(drive_bags['mcap'], run_pipeline=True)
    proc = _cli('bag', 'eval', '--input', drive_bags['mcap'], '--run-pipeline')
    assert proc.returncode == 2 and 'lane_seg.pipeline' in proc.stderr
    assert 'Traceback' not in proc.stderr


# The shipped models on the synthetic drive at the lane model's validation size (384x512,
# docs/lane_model.md); 6 frames measured IoU 0.674 (pooled) and EPE 4.81 px on onnxruntime.
ACC_FRAMES, ACC_H, ACC_W = 6, 384, 512
MIN_IOU, MAX_EPE = 0.6, 6.5


@pytest.fixture(scope='module')
def shipped():
    """Load the shipped int8 lane and flow pipelines on onnxruntime, as ``lane-seg eval`` does."""
    if not _pipeline_importable():
        pytest.skip('lane_seg.pipeline is not importable')
    from lane_seg.evaluate import _model_path
    from lane_seg.pipeline.flow import FlowPipeline
    from lane_seg.pipeline.lanes import LanePipeline
    try:
        paths = _model_path(None, 'seg'), _model_path(None, 'flow')
    except Exception as exc:   # ResourceError: models not built
        pytest.skip(f'shipped models not available ({exc})')
    lanes = LanePipeline.from_model(paths[0], backend='onnxruntime')
    flow = FlowPipeline.from_model(paths[1], backend='onnxruntime')
    yield paths, (lanes, flow)
    lanes.close()
    flow.close()


@pytest.fixture(scope='module')
def accuracy_bag(tmp_path_factory):
    root = tmp_path_factory.mktemp('accuracy')
    return make_bag(root / 'bag', frames=ACC_FRAMES, seed=SEED, height=ACC_H,
                    width=ACC_W)['bag']


def test_run_pipeline_with_the_shipped_models(accuracy_bag, shipped):
    report = evaluate_bag(accuracy_bag, run_pipeline=True, pipelines=shipped[1])
    mask, flow = report['mask'], report['flow']
    assert mask['matched'] == ACC_FRAMES and mask['rejected'] == 0 and mask['missing'] == 0
    assert flow['matched'] == ACC_FRAMES - 1 and flow['missing'] == 0
    assert flow['unmatched'] == 0 and flow['input_stamp_repeats'] == 0
    assert mask['pipeline_errors'] == 0 and flow['pipeline_errors'] == 0
    assert mask['iou_pooled'] > MIN_IOU and mask['iou'] > MIN_IOU
    assert 0.0 < flow['epe'] < MAX_EPE and flow['fl_all'] < 0.5
    assert report['latency']['mask']['count'] == ACC_FRAMES
    assert report['latency']['flow']['count'] == ACC_FRAMES


def test_bag_eval_gives_the_same_accuracy_as_lane_seg_eval(accuracy_bag, shipped, tmp_path):
    """
    ``bag eval --run-pipeline`` and ``lane-seg eval`` agree on the same frames.

    The bag holds the drive's frames as bgra8 (alpha 255) and the folder as bgr8 PNG: the same
    pixels, so both run the same model on the same tensors. Like is compared with like: the
    pooled IoU (summed pixel counts) against ``eval_seg``'s IoU and F1, and the EPE over all
    valid pixels against ``eval_flow``'s EPE and Fl-all. ``eval`` rounds to 4 decimals, so
    the tolerance is 1e-4 (plus float noise), far below any real difference such as a
    frame off by one (IoU changes by ~0.01 per frame here, EPE by ~0.5 px).
    """
    from lane_seg.evaluate import eval_flow, eval_seg
    from lane_seg.sim.export import export_drive
    (lane_model, flow_model), _ = shipped
    folder = tmp_path / 'folder'
    export_drive(folder, ACC_FRAMES, seed=SEED, height=ACC_H, width=ACC_W, progress=False)
    report = evaluate_bag(accuracy_bag, run_pipeline=True, pipelines=shipped[1])
    seg = eval_seg(folder, model=lane_model, backend='onnxruntime')
    flow = eval_flow(folder, model=flow_model, backend='onnxruntime')
    assert seg['frames'] == report['mask']['scored'] == ACC_FRAMES
    assert flow['frames'] == report['flow']['scored'] == ACC_FRAMES - 1
    assert report['flow']['unmatched'] == 0   # the pipeline used before was reset
    tol = 1.5e-4
    assert report['mask']['iou_pooled'] == pytest.approx(seg['iou'], abs=tol)
    assert report['mask']['f1_pooled'] == pytest.approx(seg['f1'], abs=tol)
    assert report['flow']['epe_pixels'] == pytest.approx(flow['epe'], abs=tol)
    assert report['flow']['fl_all'] == pytest.approx(flow['fl_all'], abs=tol)


def test_cli_make_info_and_eval(tmp_path):
    bag = tmp_path / 'cli'
    proc = _cli('bag', 'make', '--out', bag, '--frames', 3, '--size', '24x48', '--seed', 1,
                '--storage', 'sqlite3', '--quiet')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)['topics'][IMAGE_TOPIC] == 3
    info = json.loads(_cli('bag', 'info', bag).stdout)
    assert info['storage'] == 'sqlite3' and info['topics'][GT_FLOW_TOPIC]['count'] == 2
    proc = _cli('bag', 'eval', '--input', bag)
    assert proc.returncode == 2 and 'no mask or flow output topic' in proc.stderr
    out = _outputs_bag(tmp_path / 'out', bag)
    proc = _cli('bag', 'eval', '--input', bag, '--output', out, '--json')
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report['mask']['iou'] == 1.0 and report['flow']['matched'] == 2
