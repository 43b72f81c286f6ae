"""
rosbag2 reading and writing over ``rosbags`` (pure Python; no rosbag2_py, no ROS install).

Bags are rosbag2 directories (``metadata.yaml`` + one ``.mcap`` or ``.db3`` file) as
``ros2 bag record`` writes them, in either storage plugin.  What this module settles:

* **Message definitions** come from rosbags' ``ros2_kilted`` typestore, the distribution whose
  rclpy this package runs.  The definitions of every type the package writes (``sensor_msgs``
  Image and CameraInfo, ``rosgraph_msgs/Clock``, ``diagnostic_msgs``, ``std_msgs``) are identical
  from Humble to Kilted, so their RIHS01 hashes are too (the tests check both that and the hash
  the live rclpy publisher announces).  Types the typestore lacks are taken from the bag's own
  definitions when reading, and from the rclpy class when recording.
* **Format version 8** with integer QoS enums in ``offered_qos_profiles``: the newest layout
  rosbags writes whose QoS block Humble's reader parses (version 9 spells the enums as
  strings); Jazzy and Kilted read it as well.
* **Damaged bags**: a bag rosbags refuses to open (an ``.mcap`` cut short, a missing
  ``metadata.yaml``) is *salvaged*: the ``.mcap`` records (uncompressed, zstd or lz4 chunks,
  partial trailing chunks included) or the sqlite tables are read directly, every complete
  message before the damage is returned and the damage is described in
  :attr:`BagReader.warnings`.  Storage errors while iterating end the iteration with a warning
  instead of an exception; messages whose CDR bytes do not decode raise :class:`DecodeError` from
  :meth:`BagReader.decode` so callers skip and count them.  Counts that disagree with
  ``metadata.yaml`` (rows deleted from a ``.db3``) are reported by :meth:`BagReader.integrity`.
"""  # noqa: A005

from dataclasses import dataclass, field
import mmap
from pathlib import Path
import sqlite3
import struct

import numpy as np
from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.rosbag2.metadata import parse_qos
from rosbags.typesys import get_types_from_msg, get_typestore, Stores
import yaml

from ..image_conversion import numpy_to_image

STORE = Stores.ROS2_KILTED
BAG_VERSION = 8
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}

# Topic names of a drive recorded like the CARLA ROS bridge, plus the package's ground truth.
CAMERA_FRAME_ID = 'ego_vehicle/rgb_front'
IMAGE_TOPIC = '/carla/ego_vehicle/rgb_front/image'
CAMERA_INFO_TOPIC = '/carla/ego_vehicle/rgb_front/camera_info'
GT_LANE_MASK_TOPIC = '/lane_seg/gt/lane_mask'
GT_LANE_IDS_TOPIC = '/lane_seg/gt/lane_ids'
GT_FLOW_TOPIC = '/lane_seg/gt/flow'
GT_FLOW_VALID_TOPIC = '/lane_seg/gt/flow_valid'

IMAGE_TYPE = 'sensor_msgs/msg/Image'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'

MCAP_MAGIC = b'\x89MCAP0\r\n'


class BagError(ValueError):
    """A bag that cannot be opened, written or understood; the text names the problem."""


class DecodeError(BagError):
    """One message whose bytes do not deserialize as its type (corrupted or truncated CDR)."""


def typestore():
    """
    Return a new typestore with the Kilted message definitions (register into it freely).

    A fresh instance per caller keeps types registered from one bag out of the others.
    """
    return get_typestore(STORE)


def qos(reliable=True, depth=10, transient_local=False):
    """Make a rosbags QoS profile (default: reliable, keep-last 10, volatile, as CARLA's)."""
    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth,
               QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


def storage_plugin(name):
    try:
        return STORAGES[name]
    except KeyError:
        raise BagError(f'unknown storage {name!r}; use one of {", ".join(STORAGES)}') from None


def stamp_ns(stamp):
    """Nanoseconds of a ``builtin_interfaces/Time`` (rosbags or rclpy)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def header_stamp_ns(msg):
    """Header stamp of a message in nanoseconds, or None when it has no header."""
    header = getattr(msg, 'header', None)
    return None if header is None else stamp_ns(header.stamp)


def make_header(store, stamp, frame_id):
    """Make a rosbags ``std_msgs/Header`` at ``stamp`` nanoseconds."""
    time_cls = store.types['builtin_interfaces/msg/Time']
    header_cls = store.types['std_msgs/msg/Header']
    sec, nanosec = divmod(int(stamp), 1_000_000_000)
    return header_cls(stamp=time_cls(sec=sec, nanosec=nanosec), frame_id=frame_id)


def make_image(store, array, encoding, stamp, frame_id):
    """Make a rosbags ``sensor_msgs/Image`` holding a copy of ``array``."""
    image_cls = store.types[IMAGE_TYPE]
    msg = image_cls(header=make_header(store, stamp, frame_id), height=0, width=0, encoding='',
                    is_bigendian=0, step=0, data=np.empty(0, np.uint8))
    return numpy_to_image(array, encoding, msg=msg)


def register_msgdef(store, msgtype, msgdef):
    """Register ``msgtype`` (and the types its concatenated .msg definition embeds)."""
    if not msgdef:
        raise BagError(f'no message definition for {msgtype}')
    try:
        types = get_types_from_msg(msgdef, msgtype)
    except Exception as exc:   # rosbags raises several parser errors
        raise BagError(f'cannot parse the definition of {msgtype}: {exc}') from None
    store.register({name: fields for name, fields in types.items()
                    if name not in store.fielddefs})


# --------------------------------------------------------------------------------- writing


class BagWriter:
    """
    Write a rosbag2 bag (context manager).

    >>> with BagWriter(path, storage='mcap') as bag:
    ...     bag.add_topic('/image', 'sensor_msgs/msg/Image')
    ...     bag.write('/image', image_msg, stamp_ns)       # rosbags message
    ...     bag.write_raw('/image', cdr_bytes, stamp_ns)  # bytes as they are

    The bag is closed (``metadata.yaml`` written) on exit, also after an exception, so that
    whatever was recorded before a failure stays readable.
    """

    def __init__(self, path, storage='mcap', store=None, custom_data=None):
        self.path = Path(path)
        self.storage = storage
        self.store = store if store is not None else typestore()
        try:
            self._writer = Writer(self.path, version=BAG_VERSION,
                                  storage_plugin=storage_plugin(storage))
        except WriterError as exc:
            raise BagError(str(exc)) from None
        for key, value in (custom_data or {}).items():
            self._writer.set_custom_data(str(key), str(value))
        self._topics = {}
        self.counts = {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        """Create the bag directory and storage file."""
        try:
            self._writer.open()
        except WriterError as exc:
            raise BagError(str(exc)) from None

    def close(self):
        if self._writer is not None and self._writer.storage is not None:
            self._writer.close()
        self._writer = None

    @property
    def topics(self):
        return {topic: conn.msgtype for topic, conn in self._topics.items()}

    def add_topic(self, topic, msgtype, offered_qos=None, msgdef=None, rihs01=None):
        """
        Declare a topic; ``msgdef``/``rihs01`` are needed only for types the typestore lacks.

        ``offered_qos`` is a list of rosbags QoS profiles (default: one reliable depth-10).
        """
        if topic in self._topics:
            if self._topics[topic].msgtype != msgtype:
                raise BagError(f'{topic} already holds {self._topics[topic].msgtype}, '
                               f'not {msgtype}')
            return self._topics[topic]
        if msgtype not in self.store.fielddefs and msgdef is not None:
            register_msgdef(self.store, msgtype, msgdef)
        profiles = [qos()] if offered_qos is None else list(offered_qos)
        kwargs = {'msgdef': msgdef, 'rihs01': rihs01} if msgdef and rihs01 else {
            'typestore': self.store}
        if 'typestore' in kwargs and msgtype not in self.store.fielddefs:
            raise BagError(f'unknown message type {msgtype}: pass its msgdef and rihs01')
        try:
            conn = self._writer.add_connection(topic, msgtype, offered_qos_profiles=profiles,
                                               **kwargs)
        except WriterError as exc:
            raise BagError(str(exc)) from None
        self._topics[topic] = conn
        self.counts[topic] = 0
        return conn

    def write(self, topic, msg, stamp):
        """Serialize a rosbags message of the topic's type and write it at ``stamp`` ns."""
        conn = self._connection(topic)
        self.write_raw(topic, self.store.serialize_cdr(msg, conn.msgtype), stamp)

    def write_raw(self, topic, data, stamp):
        """Write serialized CDR bytes as they are (record, or a deliberately corrupted message)."""
        conn = self._connection(topic)
        self._writer.write(conn, int(stamp), bytes(data))
        self.counts[topic] += 1

    def _connection(self, topic):
        try:
            return self._topics[topic]
        except KeyError:
            raise BagError(f'topic {topic} was not added to the bag') from None


# --------------------------------------------------------------------------------- reading


@dataclass
class TopicInfo:
    """One topic of a bag; ``count`` is what ``metadata.yaml`` claims (None when unknown)."""

    topic: str
    msgtype: str
    msgdef: str = ''
    digest: str = ''
    count: int | None = None
    offered_qos: list = field(default_factory=list)


@dataclass(frozen=True)
class BagMessage:
    """A serialized message: ``timestamp`` is the bag (receive) time in nanoseconds."""

    topic: str
    msgtype: str
    timestamp: int
    data: bytes


class BagReader:
    """
    Read a rosbag2 bag (directory, or a lone ``.mcap`` / ``.db3`` file), salvaging damage.

    >>> with BagReader(path) as bag:
    ...     for m in bag.messages(['/image']):
    ...         try:
    ...             msg = bag.decode(m)
    ...         except DecodeError as exc:
    ...             ...   # count and skip
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f'{self.path}: no such bag')
        self.warnings = []
        self.salvaged = False
        self.storage = None
        self.store = typestore()
        self.read_counts = {}
        self._complete = set()
        self.storage_errors = 0
        self._reader = None
        self._source = None
        self._open()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- opening

    def _storage_files(self):
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.suffix in ('.mcap', '.db3'))

    def _open(self):
        target = self.path
        files = self._storage_files()
        if self.path.is_dir() and not (self.path / 'metadata.yaml').exists():
            self.warnings.append(f'{self.path}: no metadata.yaml (recording interrupted?)')
            if len(files) == 1:
                target = files[0]
        try:
            reader = Reader(target)
            reader.open()
        except (ReaderError, FileNotFoundError, NotADirectoryError, KeyError, TypeError,
                ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            self.warnings.append(f'rosbags cannot open {target} ({reason}); salvaging')
            self._salvage(files)
            return
        except Exception as exc:   # apsw raises its own errors on a malformed database
            self.warnings.append(f'rosbags cannot open {target} ({type(exc).__name__}: {exc});'
                                 f' salvaging')
            self._salvage(files)
            return
        self._reader = reader
        self.storage = _storage_of(files)
        self.topics = {}
        for conn in reader.connections:
            info = self.topics.get(conn.topic)
            if info is None:
                self.topics[conn.topic] = TopicInfo(
                    conn.topic, conn.msgtype, conn.msgdef.data, conn.digest, conn.msgcount,
                    list(getattr(conn.ext, 'offered_qos_profiles', []) or []))
            else:
                info.count = (info.count or 0) + conn.msgcount
        self.start_ns = reader.start_time if reader.message_count else 0
        self.end_ns = reader.end_time - 1 if reader.message_count else 0
        self.message_count = reader.message_count
        self.custom_data = _metadata(self.path).get('custom_data') or {}
        self._register_unknown()

    def _salvage(self, files):
        if not files:
            raise BagError(f'{self.path}: no .mcap or .db3 file to read')
        meta = _metadata(self.path)
        expected = _metadata_counts(self.path)
        if files[0].suffix == '.mcap':
            self.storage = 'mcap'
            self._source = _McapSalvage(files, self.warnings)
        else:
            self.storage = 'sqlite3'
            self._source = _SqliteSalvage(files, self.warnings)
        self.salvaged = True
        self.topics = self._source.topics
        declared = _metadata_types(meta)
        for topic, count in expected.items():
            if topic not in self.topics:   # its channel record was lost with the damage
                self.topics[topic] = TopicInfo(topic, declared.get(topic, ''))
            self.topics[topic].count = count
        self.start_ns = self.end_ns = 0
        self.message_count = sum(expected.values()) if expected else None
        self.custom_data = meta.get('custom_data') or {}
        self._register_unknown()

    def _register_unknown(self):
        for info in self.topics.values():
            if info.msgtype not in self.store.fielddefs and info.msgdef:
                try:
                    register_msgdef(self.store, info.msgtype, info.msgdef)
                except BagError as exc:
                    self.warnings.append(str(exc))

    # -- reading

    def messages(self, topics=None):
        """
        Yield :class:`BagMessage` in storage order (time order for an intact bag).

        ``topics``: names to keep (None: all).  A storage error stops the iteration after
        recording it in :attr:`warnings` and :attr:`storage_errors`.
        """
        wanted = None if topics is None else set(topics)
        if self._reader is not None:
            conns = [c for c in self._reader.connections if wanted is None or c.topic in wanted]
            if not conns:
                return
            source = ((c.topic, c.msgtype, t, d) for c, t, d in self._reader.messages(conns))
        else:
            source = self._source.messages(wanted)
        covered = set(self.topics) if wanted is None else wanted & set(self.topics)
        try:
            for topic, msgtype, timestamp, data in source:
                self.read_counts[topic] = self.read_counts.get(topic, 0) + 1
                yield BagMessage(topic, msgtype, timestamp, data)
            self._complete |= covered
        except (ReaderError, sqlite3.Error, OSError, struct.error, ValueError) as exc:
            self.storage_errors += 1
            self.warnings.append(f'storage error after {sum(self.read_counts.values())} '
                                 f'messages, reading stopped: {exc}')
            self._complete |= covered
        except Exception as exc:   # apsw and decompressors raise their own errors
            self.storage_errors += 1
            self.warnings.append(f'storage error after {sum(self.read_counts.values())} '
                                 f'messages, reading stopped: {type(exc).__name__}: {exc}')
            self._complete |= covered

    def decode(self, message):
        """Deserialize a :class:`BagMessage` to a rosbags message (:class:`DecodeError` if not)."""
        if message.msgtype not in self.store.fielddefs:
            raise DecodeError(f'{message.topic}: no definition for type {message.msgtype}')
        try:
            return self.store.deserialize_cdr(message.data, message.msgtype)
        except Exception as exc:   # rosbags' deserializers fail in many ways on bad bytes
            raise DecodeError(
                f'{message.topic} at {message.timestamp} ns: {len(message.data)} bytes do not '
                f'decode as {message.msgtype} ({type(exc).__name__}: {exc})') from None

    def integrity(self):
        """
        Compare what was read with ``metadata.yaml``, for topics read to the end so far.

        Returns ``{topic: {'expected': n, 'read': m}}`` for the topics where the two differ.
        """
        out = {}
        for topic in sorted(self._complete):
            info = self.topics[topic]
            read = self.read_counts.get(topic, 0)
            if info.count is not None and info.count != read:
                out[topic] = {'expected': info.count, 'read': read}
        return out

    def reset_counts(self):
        """Forget what was read (before another pass over the bag)."""
        self.read_counts.clear()
        self._complete.clear()

    def info(self):
        """Summarize as JSON-able dict: storage, time span, per-topic type and count."""
        return {
            'path': str(self.path), 'storage': self.storage, 'salvaged': self.salvaged,
            'message_count': self.message_count, 'start_ns': self.start_ns,
            'end_ns': self.end_ns, 'duration_s': (self.end_ns - self.start_ns) / 1e9,
            'topics': {t: {'type': i.msgtype, 'count': i.count}
                       for t, i in sorted(self.topics.items())},
            'custom_data': self.custom_data, 'warnings': list(self.warnings),
        }


def _storage_of(files):
    for p in files:
        if p.suffix == '.mcap':
            return 'mcap'
        if p.suffix == '.db3':
            return 'sqlite3'
    return None


def _metadata(path):
    meta = path / 'metadata.yaml' if path.is_dir() else path.parent / 'metadata.yaml'
    try:
        info = yaml.safe_load(meta.read_text())['rosbag2_bagfile_information']
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return info if isinstance(info, dict) else {}


def _metadata_types(meta):
    try:
        return {t['topic_metadata']['name']: str(t['topic_metadata']['type'])
                for t in meta.get('topics_with_message_count') or []}
    except (KeyError, TypeError):
        return {}


def _metadata_counts(path):
    try:
        return {t['topic_metadata']['name']: int(t['message_count'])
                for t in _metadata(path).get('topics_with_message_count') or []}
    except (KeyError, TypeError, ValueError):
        return {}


def _parse_qos_text(text):
    try:
        return parse_qos(text)
    except Exception:   # an unreadable QoS block only loses the QoS
        return []


class _McapReader:
    """Minimal streaming MCAP record parser that stops cleanly where the file is cut."""

    def __init__(self, buf, name, warnings):
        self.buf = buf
        self.name = name
        self.warnings = warnings

    @staticmethod
    def _string(buf, pos):
        (n,) = struct.unpack_from('<I', buf, pos)
        end = pos + 4 + n
        if end > len(buf):
            raise struct.error('string runs past the record')
        return bytes(buf[pos + 4:end]).decode(), end

    def records(self, buf, pos, where):
        """Yield (opcode, body) until the end of ``buf``; a cut record ends with a warning."""
        size = len(buf)
        while pos < size:
            if pos + 9 > size:
                self.warnings.append(f'{self.name}: {where} cut inside a record header at '
                                     f'byte {pos}')
                return
            op = buf[pos]
            (length,) = struct.unpack_from('<Q', buf, pos + 1)
            if pos + 9 + length > size:
                yield op, None, memoryview(buf)[pos + 9:]
                return
            yield op, length, memoryview(buf)[pos + 9:pos + 9 + length]
            pos += 9 + length


class _McapSalvage:
    """Messages of ``.mcap`` files rosbags cannot open, in file order."""

    def __init__(self, files, warnings):
        self.files = files
        self.warnings = warnings
        self.schemas = {}
        self.channels = {}
        self.topics = {}
        self._prescan()

    def _prescan(self):
        for _ in self._iterate(None, collect_only=True):
            pass

    def messages(self, wanted):
        for item in self._iterate(wanted, collect_only=False):
            yield item

    def _iterate(self, wanted, collect_only):
        for path in self.files:
            if path.stat().st_size < len(MCAP_MAGIC):
                if collect_only:
                    self.warnings.append(f'{path.name}: empty or cut before the MCAP magic')
                continue
            with path.open('rb') as fh, \
                    mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if bytes(buf[:8]) != MCAP_MAGIC:
                    raise BagError(f'{path}: not an MCAP file (bad magic)')
                parser = _McapReader(buf, path.name, self.warnings if collect_only else [])
                yield from self._walk(parser, buf, 8, 'file', wanted, collect_only)

    def _walk(self, parser, buf, pos, where, wanted, collect_only):
        for op, length, body in parser.records(buf, pos, where):
            if length is None:
                if op == 0x06:   # a chunk cut short: read what it holds
                    yield from self._chunk(parser, body, wanted, collect_only, partial=True)
                elif collect_only:
                    self.warnings.append(f'{parser.name}: {where} cut short inside a record '
                                         f'(opcode 0x{op:02x})')
                return
            if op == 0x03:
                self._schema(parser, body)
            elif op == 0x04:
                self._channel(parser, body)
            elif op == 0x05:
                item = self._message(body, wanted)
                if item is not None and not collect_only:
                    yield item
            elif op == 0x06:
                yield from self._chunk(parser, body, wanted, collect_only, partial=False)
            elif op in (0x02, 0x0F):   # footer, data end: the summary section follows
                return

    def _schema(self, parser, body):
        (sid,) = struct.unpack_from('<H', body, 0)
        name, pos = parser._string(body, 2)
        encoding, pos = parser._string(body, pos)
        (n,) = struct.unpack_from('<I', body, pos)
        text = bytes(body[pos + 4:pos + 4 + n]).decode(errors='replace')
        self.schemas[sid] = (name, encoding, text)

    def _channel(self, parser, body):
        cid, sid = struct.unpack_from('<HH', body, 0)
        topic, pos = parser._string(body, 4)
        _encoding, pos = parser._string(body, pos)
        (n,) = struct.unpack_from('<I', body, pos)
        meta, end, pos = {}, pos + 4 + n, pos + 4
        while pos < end:
            key, pos = parser._string(body, pos)
            value, pos = parser._string(body, pos)
            meta[key] = value
        name, _, text = self.schemas.get(sid, ('', '', ''))
        self.channels[cid] = (topic, name)
        if topic not in self.topics:
            self.topics[topic] = TopicInfo(
                topic, name, text, '', None,
                _parse_qos_text(meta.get('offered_qos_profiles', '')))

    def _message(self, body, wanted):
        if len(body) < 22:
            return None
        (cid,) = struct.unpack_from('<H', body, 0)
        (log_time,) = struct.unpack_from('<Q', body, 6)
        channel = self.channels.get(cid)
        if channel is None or (wanted is not None and channel[0] not in wanted):
            return None
        return channel[0], channel[1], log_time, bytes(body[22:])

    def _chunk(self, parser, body, wanted, collect_only, partial):
        try:
            compression, pos = parser._string(body, 28)
            (size,) = struct.unpack_from('<Q', body, pos)
        except struct.error:
            if collect_only:
                self.warnings.append(f'{parser.name}: file cut inside a chunk header')
            return
        data = body[pos + 8:pos + 8 + size]
        cut = partial or len(data) < size
        try:
            records = _decompress(compression, bytes(data), cut)
        except Exception as exc:   # a damaged compressed chunk: skip it, keep going
            if collect_only:
                self.warnings.append(f'{parser.name}: {compression} chunk unreadable ({exc})')
            return
        if cut and collect_only:
            self.warnings.append(f'{parser.name}: file cut short inside a chunk; '
                                 f'complete messages before the cut are kept')
        yield from self._walk(parser, records, 0, 'chunk', wanted, collect_only)


def _decompress(compression, data, cut):
    if compression == '':
        return data
    if compression == 'zstd':
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        if cut:
            return zstd.ZstdDecompressor().decompress(data)
        return zstd.decompress(data)
    if compression == 'lz4':
        from lz4.frame import decompress
        return decompress(data)
    raise BagError(f'unknown chunk compression {compression!r}')


class _SqliteSalvage:
    """Messages of ``.db3`` files without usable ``metadata.yaml``, in time order."""

    def __init__(self, files, warnings):
        self.files = files
        self.warnings = warnings
        self.topics = {}
        self._ids = {}
        for path in files:
            try:
                con = self._connect(path)
                cols = {row[1] for row in con.execute('PRAGMA table_info(topics)')}
                qos_col = 'offered_qos_profiles' if 'offered_qos_profiles' in cols else "''"
                rows = con.execute(
                    f'SELECT id, name, type, {qos_col} FROM topics').fetchall()
                defs = {}
                if con.execute("SELECT name FROM sqlite_master WHERE type='table' AND "
                               "name='message_definitions'").fetchone():
                    defs = dict(con.execute('SELECT topic_type, encoded_message_definition '
                                            'FROM message_definitions').fetchall())
                con.close()
            except sqlite3.Error as exc:
                raise BagError(f'{path}: cannot read the sqlite3 storage ({exc}); a damaged '
                               f'.db3 may be recoverable with `sqlite3 {path.name} .recover`'
                               ) from None
            for tid, name, msgtype, qos_text in rows:
                self._ids[(path, tid)] = (name, msgtype)
                if name not in self.topics:
                    self.topics[name] = TopicInfo(name, msgtype, defs.get(msgtype, ''), '',
                                                  None, _parse_qos_text(qos_text))

    @staticmethod
    def _connect(path):
        return sqlite3.connect(f'file:{path}?mode=ro', uri=True)

    def messages(self, wanted):
        for path in self.files:
            con = self._connect(path)
            try:
                cur = con.execute('SELECT topic_id, timestamp, data FROM messages '
                                  'ORDER BY timestamp, id')
                for tid, timestamp, data in cur:
                    topic, msgtype = self._ids.get((path, tid), (None, None))
                    if topic is None or (wanted is not None and topic not in wanted):
                        continue
                    yield topic, msgtype, timestamp, bytes(data)
            finally:
                con.close()


def bag_info(path):
    """Summary of a bag (see :meth:`BagReader.info`)."""
    with BagReader(path) as bag:
        return bag.info()
