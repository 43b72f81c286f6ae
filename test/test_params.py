"""Parameter specs, their validation and descriptors, the pipeline arguments and QoS profiles."""

import os

from lane_seg.ros.params import (CAMERA_SIM_SPECS, FLOW_SPECS, FlowParams, LANE_SPECS,
                                 LaneSegParams, Spec)
from lane_seg.ros.qos import input_qos, output_qos
import pytest
import rclpy
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy

DOMAIN_ID = 50 + (os.getpid() + 37) % 50
LANE = {spec.name: spec for spec in LANE_SPECS}


def lane_params(**changes):
    values = {spec.name: spec.default for spec in LANE_SPECS}
    values.update(changes)
    return LaneSegParams(**values)


@pytest.mark.parametrize('specs', [LANE_SPECS, FLOW_SPECS, CAMERA_SIM_SPECS])
def test_every_default_is_valid_and_described(specs):
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        assert spec.validate(spec.default) is None, spec.name
        desc = spec.descriptor()
        assert desc.description, spec.name
        if spec.bounds is not None:
            assert desc.floating_point_range or desc.integer_range, spec.name


@pytest.mark.parametrize('name, value, reason', [
    ('threshold', 1.2, r'1.2 outside \[0.0, 1.0\]'),
    ('threshold', float('nan'), 'not a finite number'),
    ('threshold', 1.0, 'must be below 1'),
    ('threads', 0, r'0 outside \[1, 64\]'),
    ('backend', 'tflite', "'tflite' not one of auto, onnxruntime, tensorrt, torch"),
    ('qos_reliability', 'fast', "'fast' not one of best_effort, reliable, system_default"),
    ('roi', (0.2, 0.1, 0.0, 1.0), 'needs top < bottom and left < right'),
    ('roi', (0.0, 1.0, 0.5, 0.5), 'needs top < bottom and left < right'),
    ('roi', (0.0, 1.0, -0.1, 1.0), r'outside \[0, 1\]'),
    ('roi', (0.0, 1.0, 0.0), 'needs 4 values'),
    ('input_size', (8, 512), r'each side must be in \[16, 4096\]'),
    ('input_size', (256,), 'needs 2 values'),
    ('gt_topic', 'two words', 'is not a valid topic name'),
])
def test_refusals_name_the_reason(name, value, reason):
    import re
    got = LANE[name].validate(value)
    assert got is not None and re.search(reason, got), got


@pytest.mark.parametrize('name, value', [
    ('threshold', 0.0), ('threshold', 0.35), ('roi', (0.0, 0.0, 0.0, 0.0)),
    ('roi', (0.4, 1.0, 0.0, 1.0)), ('input_size', (0, 0)), ('input_size', (256, 512)),
    ('gt_topic', '/carla/ego_vehicle/semantic_segmentation_front/image'), ('gt_topic', ''),
])
def test_accepted_values(name, value):
    assert LANE[name].validate(value) is None


def test_pipeline_kwargs_leave_model_defaults_to_the_model():
    assert lane_params().pipeline_kwargs() == {
        'model_path': None, 'backend': 'auto', 'threads': 2, 'threshold': None, 'roi': None,
        'input_size': None}
    kwargs = lane_params(model_path='/m.onnx', threshold=0.4, roi=(0.5, 1.0, 0.1, 0.9),
                         input_size=(128, 256), backend='onnxruntime').pipeline_kwargs()
    assert kwargs == {'model_path': '/m.onnx', 'backend': 'onnxruntime', 'threads': 2,
                      'threshold': 0.4, 'input_size': (128, 256),
                      'roi': {'top': 0.5, 'bottom': 1.0, 'left': 0.1, 'right': 0.9}}
    flow = FlowParams(**{spec.name: spec.default for spec in FLOW_SPECS})
    assert flow.pipeline_kwargs() == {'model_path': None, 'backend': 'auto', 'threads': 2,
                                      'max_gap_s': 0.5}


def test_range_needs_a_numeric_default():
    with pytest.raises(TypeError):
        Spec('x', 'text', 'a string', bounds=(0, 1)).descriptor()


def test_qos_profiles():
    camera = input_qos()
    assert (camera.depth, camera.history) == (1, HistoryPolicy.KEEP_LAST)
    assert camera.reliability == ReliabilityPolicy.BEST_EFFORT
    assert camera.durability == DurabilityPolicy.VOLATILE
    assert input_qos('reliable').reliability == ReliabilityPolicy.RELIABLE
    out = output_qos()
    assert (out.depth, out.reliability) == (5, ReliabilityPolicy.RELIABLE)
    assert output_qos('system_default').reliability == ReliabilityPolicy.SYSTEM_DEFAULT
    with pytest.raises(ValueError, match="qos reliability 'fast' not one of"):
        input_qos('fast')


def test_node_applies_the_qos_overrides():
    from lane_seg.ros.lane_seg_node import LaneSegNode
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    node = LaneSegNode(lambda **kwargs: None, context=context, parameter_overrides=[
        Parameter('qos_reliability', value='reliable'),
        Parameter('output_qos_reliability', value='best_effort')])
    try:
        assert node.subscription.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert node.subscription.qos_profile.depth == 1
        assert node.pub_mask.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
