"""
The launch files, parameter files and RViz configuration, checked against the real nodes.

``launch``/``launch_ros`` are not installable here (no ROS 2 install), so the launch files are
checked statically: each parses; every ``lane_seg`` executable it starts is a console script
in setup.py; every config file it names exists in config/; every launch argument it reads is
declared; every remapped topic is one the node really subscribes to (read from a live node),
and the default it is remapped to is a topic the synthetic camera (the CARLA bridge's
stand-in) really publishes. The parameter files are loaded by real nodes with
``--params-file``; the RViz displays must show topics the nodes publish. Where ``launch`` is
installed, ``sim.launch.py`` also runs for real.
"""

import ast
import importlib.util
import os
from pathlib import Path
import threading
import time
import types

from helpers import ros_domain_env
from lane_seg.ros.camera_sim_node import CameraSimNode
from lane_seg.ros.flow_node import FlowNode
from lane_seg.ros.lane_seg_node import LaneSegNode
from lane_seg.ros.params import CAMERA_SIM_SPECS, FLOW_SPECS, LANE_SPECS
import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILES = sorted((ROOT / 'launch').glob('*.launch.py'))
CONFIG = ROOT / 'config'
DOMAIN_ID = 50 + (os.getpid() + 23) % 50
NODES = {'lane_seg_node': LaneSegNode, 'flow_node': FlowNode,
         'camera_sim_node': CameraSimNode}
SPECS = {'lane_seg_node': LANE_SPECS, 'flow_node': FLOW_SPECS,
         'camera_sim_node': CAMERA_SIM_SPECS}
EXTERNAL_EXECUTABLES = {('rviz2', 'rviz2')}
HAVE_LAUNCH = all(importlib.util.find_spec(m) is not None for m in ('launch', 'launch_ros'))


class NullLanes:

    def __call__(self, image, encoding):
        return types.SimpleNamespace(mask=np.zeros(image.shape[:2], np.uint8), timings={})

    def describe(self):
        return {'model': 'null'}

    def close(self):
        pass


class NullFlow(NullLanes):
    last_reset = None

    def __call__(self, image, encoding, stamp_s):
        return None


@pytest.fixture(scope='module', autouse=True)
def ros_domain():
    with ros_domain_env(DOMAIN_ID):
        yield


def console_scripts():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == 'entry_points':
            entry_points = ast.literal_eval(node.value)
            return {line.split('=')[0].strip() for line in entry_points['console_scripts']}
    raise AssertionError('setup.py has no entry_points')


def call_name(call):
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, 'attr', None)


class LaunchFile:
    """What a launch file declares and starts, read from its syntax tree."""

    def __init__(self, path):
        self.path = path
        self.source = path.read_text()
        self.tree = ast.parse(self.source, filename=str(path))
        self.constants = {}
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    self.constants[target.id] = node.value.value
        self.calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]
        self.arguments = {}
        for call in self.by_name('DeclareLaunchArgument'):
            name = self.value(call.args[0])
            default = next((self.value(k.value) for k in call.keywords
                            if k.arg == 'default_value'), None)
            self.arguments[name] = default
        self.used_arguments = {self.value(c.args[0]) for c in self.by_name('LaunchConfiguration')}

    def by_name(self, name):
        return [c for c in self.calls if call_name(c) == name]

    def value(self, node):
        """Evaluate a constant, a module constant, a + b, or a launch argument's default."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.constants[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.value(node.left) + self.value(node.right)
        if isinstance(node, ast.Call) and call_name(node) == 'LaunchConfiguration':
            return self.arguments.get(self.value(node.args[0]))
        raise AssertionError(f'{self.path.name}:{node.lineno}: cannot evaluate '
                             f'{ast.unparse(node)}')

    def nodes(self):
        out = []
        for call in self.by_name('Node'):
            kwargs = {k.arg: k.value for k in call.keywords}
            remaps = []
            if 'remappings' in kwargs:
                for pair in kwargs['remappings'].elts:
                    remaps.append((self.value(pair.elts[0]), self.value(pair.elts[1])))
            out.append({'package': self.value(kwargs['package']),
                        'executable': self.value(kwargs['executable']),
                        'name': self.value(kwargs['name']) if 'name' in kwargs else None,
                        'remappings': remaps})
        return out

    def config_files(self):
        names = set()
        for call in self.by_name('join'):
            args = [a for a in call.args if isinstance(a, ast.Constant)]
            if args and args[0].value == 'config':
                names.add(self.value(args[-1]))
        return names


@pytest.fixture(scope='module')
def live_topics():
    """Topic names the three nodes really use, as configured by config/sim.yaml."""
    context = Context()
    rclpy.init(args=['--ros-args', '--params-file', str(CONFIG / 'sim.yaml'), '-p',
                     'width:=32', '-p', 'height:=16'],
               context=context, domain_id=DOMAIN_ID)
    nodes = [LaneSegNode(lambda **kw: NullLanes(), context=context),
             FlowNode(lambda **kw: NullFlow(), context=context),
             CameraSimNode(context=context)]
    topics = {}
    try:
        for node in nodes:
            topics[node.get_name()] = {
                'subscribes': {s.topic_name for s in node.subscriptions},
                'publishes': {p.topic_name for p in node.publishers},
            }
    finally:
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
    return topics


def test_there_are_three_launch_files():
    assert [p.name for p in LAUNCH_FILES] == ['carla.launch.py', 'replay.launch.py',
                                              'sim.launch.py']


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_parses_and_its_arguments_are_declared(path):
    launch = LaunchFile(path)
    compile(launch.source, str(path), 'exec')
    functions = {n.name for n in launch.tree.body if isinstance(n, ast.FunctionDef)}
    assert 'generate_launch_description' in functions
    assert launch.used_arguments <= set(launch.arguments), \
        launch.used_arguments - set(launch.arguments)
    for name in ('backend', 'lane_model', 'flow_model', 'rviz'):
        assert name in launch.arguments, name


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_every_executable_is_a_console_script_and_every_config_exists(path):
    launch = LaunchFile(path)
    scripts = console_scripts()
    nodes = launch.nodes()
    assert {'lane_seg_node', 'flow_node'} <= {n['executable'] for n in nodes}
    for node in nodes:
        if node['package'] == 'lane_seg':
            assert node['executable'] in scripts, node
            assert node['name'] == node['executable']   # the parameter files' node names
        else:
            assert (node['package'], node['executable']) in EXTERNAL_EXECUTABLES, node
    configs = launch.config_files()
    assert 'lane_seg.rviz' in configs
    for name in configs:
        assert (CONFIG / name).is_file(), name


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_every_remap_is_a_topic_the_node_uses_and_maps_to_a_camera_topic(path, live_topics):
    camera = live_topics['camera_sim_node']['publishes']
    for node in LaunchFile(path).nodes():
        if node['package'] != 'lane_seg':
            continue
        used = live_topics[node['executable']]['subscribes'] | \
            live_topics[node['executable']]['publishes']
        for source, target in node['remappings']:
            assert '/' + source in used, (node['executable'], source, sorted(used))
            assert target in camera, (node['executable'], target, sorted(camera))
        if node['executable'] != 'camera_sim_node':
            assert ('image', '/carla/ego_vehicle/rgb_front/image') in node['remappings']


def test_carla_launch_defaults_to_the_bridge_camera_and_can_include_the_bridge():
    launch = LaunchFile(ROOT / 'launch' / 'carla.launch.py')
    assert launch.arguments['camera_topic'] == '/carla/ego_vehicle/rgb_front/image'
    assert launch.arguments['use_sim_time'] == 'true'
    assert launch.arguments['carla_bridge'] == 'false'
    assert 'carla_ros_bridge_with_example_ego_vehicle.launch.py' in launch.source
    assert "get_package_share_directory('carla_ros_bridge')" in launch.source
    assert 'PackageNotFoundError' in launch.source


def test_replay_launch_plays_the_bag_with_its_clock_under_sim_time():
    launch = LaunchFile(ROOT / 'launch' / 'replay.launch.py')
    assert launch.arguments['bag'] is None        # required
    assert "['ros2', 'bag', 'play'" in launch.source and "'--clock'" in launch.source
    assert launch.source.count("'use_sim_time': True") == 3


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_parameters_set_in_launch_files_are_real_and_valid(path):
    """A misspelt parameter in a launch file would be ignored silently by the node."""
    launch = LaunchFile(path)
    checked = 0
    for call in launch.by_name('Node'):
        kwargs = {k.arg: k.value for k in call.keywords}
        executable = launch.value(kwargs['executable'])
        if executable not in SPECS or 'parameters' not in kwargs:
            continue
        specs = {spec.name: spec for spec in SPECS[executable]}
        for item in kwargs['parameters'].elts:
            if not isinstance(item, ast.Dict):
                continue   # a parameter file, checked by the test below
            for key in item.keys:
                name = launch.value(key)
                assert name in specs or name == 'use_sim_time', (path.name, executable, name)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_each_node_is_pinned_by_its_own_cpus_argument(path):
    """``lane_cpus`` reaches lane_seg_node's cpu_affinity and ``flow_cpus`` flow_node's."""
    launch = LaunchFile(path)
    spec = next(s for s in LANE_SPECS if s.name == 'cpu_affinity')
    seen = {}
    for call in launch.by_name('Node'):
        kwargs = {k.arg: k.value for k in call.keywords}
        executable = launch.value(kwargs['executable'])
        for item in kwargs['parameters'].elts:
            if isinstance(item, ast.Dict):
                values = dict(zip((launch.value(k) for k in item.keys), item.values))
                if 'cpu_affinity' in values:
                    seen[executable] = values['cpu_affinity'].id
    assert seen == {'lane_seg_node': 'lane_cpus', 'flow_node': 'flow_cpus'}
    for argument in ('lane_cpus', 'flow_cpus'):
        assert launch.arguments[argument] == '' and spec.validate('') is None
        assert f"{argument} = ParameterValue(LaunchConfiguration('{argument}'), " \
               'value_type=str)' in launch.source


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_large_image_transport_sets_the_shipped_fast_dds_profile(path):
    """The profile reaches every process the launch starts, switchable by an argument."""
    launch = LaunchFile(path)
    expected = 'false' if path.name == 'carla.launch.py' else 'true'  # the bridge runs apart
    assert launch.arguments['large_image_transport'] == expected
    (call,) = launch.by_name('SetEnvironmentVariable')
    assert launch.value(call.args[0]) == 'FASTDDS_DEFAULT_PROFILES_FILE'
    assert 'fastdds_large_images.xml' in launch.config_files()
    assert (CONFIG / 'fastdds_large_images.xml').is_file()
    condition = next(k.value for k in call.keywords if k.arg == 'condition')
    assert ast.unparse(condition) == "IfCondition(LaunchConfiguration('large_image_transport'))"
    # first in the description: set before any process (and the included bridge) starts
    body = next(n for n in ast.walk(launch.tree) if isinstance(n, ast.Call)
                and call_name(n) == 'LaunchDescription').args[0].elts
    first_process = min(i for i, e in enumerate(body) if isinstance(e, ast.Call)
                        and call_name(e) in ('Node', 'OpaqueFunction'))
    index = next(i for i, e in enumerate(body) if e is call)
    assert index < first_process


def test_camera_qos_is_a_launch_argument_where_the_source_publishes_reliable():
    for name in ('carla.launch.py', 'replay.launch.py'):
        launch = LaunchFile(ROOT / 'launch' / name)
        assert launch.arguments['camera_qos'] == 'reliable'
        default = launch.arguments['camera_qos']
        spec = next(s for s in LANE_SPECS if s.name == 'qos_reliability')
        assert spec.validate(default) is None and spec.validate('best_effort') is None
        assert launch.source.count("'qos_reliability': camera_qos") == 2


@pytest.mark.parametrize('name', ['lane_seg.yaml', 'flow.yaml', 'sim.yaml'])
def test_parameter_files_name_only_real_parameters(name):
    data = yaml.safe_load((CONFIG / name).read_text())
    assert data, name
    for node_name, section in data.items():
        params = section['ros__parameters']
        specs = {spec.name: spec for spec in SPECS[node_name]}
        assert set(params) <= set(specs), set(params) - set(specs)
        for key, value in params.items():
            assert type(value) is type(specs[key].default), (node_name, key, value)
            assert specs[key].validate(value) is None, (node_name, key, value)


@pytest.mark.parametrize('name', ['lane_seg.yaml', 'flow.yaml', 'sim.yaml'])
def test_real_nodes_start_with_the_parameter_files(name):
    data = yaml.safe_load((CONFIG / name).read_text())
    context = Context()
    rclpy.init(args=['--ros-args', '--params-file', str(CONFIG / name), '-p', 'width:=32',
                     '-p', 'height:=16'], context=context, domain_id=DOMAIN_ID)
    factories = {'lane_seg_node': lambda **kw: NullLanes(),
                 'flow_node': lambda **kw: NullFlow()}
    try:
        for node_name, section in data.items():
            cls = NODES[node_name]
            args = (factories[node_name],) if node_name in factories else ()
            node = cls(*args, context=context)
            try:
                for key, value in section['ros__parameters'].items():
                    if key in ('width', 'height'):
                        continue
                    got = getattr(node.params.config, key)
                    assert got == (tuple(value) if isinstance(value, list) else value), key
            finally:
                node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_sim_ground_truth_topics_are_published_by_the_camera(live_topics):
    data = yaml.safe_load((CONFIG / 'sim.yaml').read_text())
    camera = live_topics['camera_sim_node']['publishes']
    for node_name in ('lane_seg_node', 'flow_node'):
        gt = data[node_name]['ros__parameters']['gt_topic']
        assert gt in camera, (node_name, gt)
        assert gt in live_topics[node_name]['subscribes']


def test_rviz_shows_camera_overlay_flow_and_mask_from_real_topics(live_topics):
    rviz = yaml.safe_load((CONFIG / 'lane_seg.rviz').read_text())
    displays = rviz['Visualization Manager']['Displays']
    published = set().union(*(t['publishes'] for t in live_topics.values()))
    assert [d['Class'] for d in displays] == ['rviz_default_plugins/Image'] * 4
    topics = [d['Topic']['Value'] for d in displays]
    assert topics == ['/carla/ego_vehicle/rgb_front/image', '/lane_seg_node/overlay',
                      '/flow_node/flow_vis', '/lane_seg_node/mask']
    assert set(topics) <= published
    camera = displays[0]['Topic']
    assert camera['Reliability Policy'] == 'Best Effort'   # matches any camera publisher
    assert rviz['Visualization Manager']['Global Options']['Fixed Frame'] == \
        'ego_vehicle/rgb_front'


def test_setup_installs_launch_and_config_files():
    source = (ROOT / 'setup.py').read_text()
    assert "_files('launch/*.launch.py')" in source and "_files('config/*')" in source


@pytest.mark.skipif(not HAVE_LAUNCH, reason='launch/launch_ros not installed (no ROS 2 '
                                            'install); the launch files are checked '
                                            'statically above')
def test_sim_launch_runs_for_real():
    """With ROS 2 installed and lane_seg built: sim.launch.py brings masks and flow."""
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from sensor_msgs.msg import Image
    try:
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory('lane_seg'))
    except Exception as exc:
        pytest.skip(f'lane_seg is not installed in an ament prefix: {exc}')
    service = LaunchService()
    service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(share / 'launch' / 'sim.launch.py')))]))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    got = {'/lane_seg_node/mask': [], '/flow_node/flow': []}
    node = rclpy.create_node('launch_probe', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    for topic, out in got.items():
        node.create_subscription(Image, topic, out.append, 5)
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not all(got.values()):
            executor.spin_once(timeout_sec=0.1)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        service.shutdown()
        thread.join(10.0)
    assert all(got.values()), {k: len(v) for k, v in got.items()}
    assert got['/lane_seg_node/mask'][0].header.frame_id == 'ego_vehicle/rgb_front'
