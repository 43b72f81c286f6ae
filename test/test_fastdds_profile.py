"""
config/fastdds_large_images.xml: Fast DDS really applies it, and large frames cross processes.

The profile gives every participant a shared-memory segment that holds several 800x600 bgra8
frames; with Fast DDS's default 0.5 MB segments the nodes received only a third of a 30 Hz
camera (docs/bench/node_soak.md). Checked here with the real rmw: a participant started with
the profile creates its segment at the configured size, and a reliable subscriber in another
process receives every one of a burst of 1.9 MB frames.
"""

import os
from pathlib import Path
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET


ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / 'config' / 'fastdds_large_images.xml'
NS = {'f': 'http://www.eprosima.com'}
FRAME_BYTES = 800 * 600 * 4
DOMAIN_ID = 100 + (os.getpid() + 41) % 60


def segment_size():
    root = ET.parse(PROFILE).getroot()
    shm = [d for d in root.iter('{http://www.eprosima.com}transport_descriptor')
           if d.find('f:type', NS).text == 'SHM']
    assert len(shm) == 1
    return int(shm[0].find('f:segment_size', NS).text)


def test_profile_is_the_default_participant_profile_with_a_large_shm_segment():
    root = ET.parse(PROFILE).getroot()
    participant = root.find('.//f:participant', NS)
    assert participant.get('is_default_profile') == 'true'
    assert participant.find('.//f:useBuiltinTransports', NS).text == 'false'
    ids = [e.text for e in participant.findall('.//f:userTransports/f:transport_id', NS)]
    types = {d.find('f:transport_id', NS).text: d.find('f:type', NS).text
             for d in root.iter('{http://www.eprosima.com}transport_descriptor')}
    assert sorted(types[i] for i in ids) == ['SHM', 'UDPv4']   # UDP: discovery, other hosts
    assert segment_size() >= 8 * FRAME_BYTES


SUBSCRIBER = textwrap.dedent("""
    import sys, time
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('profile_sub')
    sizes = []
    node.create_subscription(Image, 'big', lambda m: sizes.append(len(m.data)),
                             QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
    print('ready', flush=True)
    end = time.monotonic() + 20
    while time.monotonic() < end and len(sizes) < int(sys.argv[1]):
        rclpy.spin_once(node, timeout_sec=0.05)
    print(len(sizes), sorted(set(sizes)), flush=True)
""")

PUBLISHER = textwrap.dedent("""
    import array, sys, time
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    rclpy.init()
    node = rclpy.create_node('profile_pub')
    pub = node.create_publisher(Image, 'big',
                                QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
    end = time.monotonic() + 15
    while pub.get_subscription_count() == 0 and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.5)
    msg = Image(height=600, width=800, encoding='bgra8', step=3200)
    msg.data = array.array('B', bytes(800 * 600 * 4))
    for _ in range(int(sys.argv[1])):
        pub.publish(msg)
        time.sleep(1 / 30)
    time.sleep(2.0)
""")


def test_large_frames_cross_processes_with_the_profile_and_its_segment_is_used(tmp_path):
    env = dict(os.environ, FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE),
               ROS_DOMAIN_ID=str(DOMAIN_ID), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    count = 30
    before = set(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else set()
    sub = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, str(count)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sub.stdout.readline().strip() == 'ready'
        if os.path.isdir('/dev/shm'):
            # the subscriber's participant created its segment at the profile's size
            new = [Path('/dev/shm', n) for n in set(os.listdir('/dev/shm')) - before
                   if n.startswith('fastdds_') and not n.endswith('_el')]
            assert any(p.stat().st_size >= segment_size() for p in new), \
                [(p.name, p.stat().st_size) for p in new]
        pub = subprocess.run([sys.executable, '-c', PUBLISHER, str(count)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert pub.returncode == 0, pub.stdout + pub.stderr
        out, _ = sub.communicate(timeout=30)
    finally:
        sub.kill()
    received, sizes = out.strip().splitlines()[-1].split(' ', 1)
    assert int(received) == count and sizes == f'[{FRAME_BYTES}]', out
