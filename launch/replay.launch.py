"""
Replay a recorded bag through both perception nodes.

``ros2 launch lane_seg replay.launch.py bag:=PATH``.

``ros2 bag play --clock`` publishes the bag's time on ``/clock`` and the nodes run with
``use_sim_time``, so end-to-end latency (node clock minus header stamp) stays right at any
``rate``. Arguments: ``bag`` (required), ``rate``, ``loop``, ``camera_topic``,
``camera_info_topic``, ``backend``, ``lane_model``, ``flow_model``, ``rviz``, ``lane_cpus`` and
``flow_cpus`` (the nodes' ``cpu_affinity``; default: any CPU). Parameters come from
``config/lane_seg.yaml`` and ``config/flow.yaml``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, ExecuteProcess, OpaqueFunction,
                            SetEnvironmentVariable)
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def _bag_play(context):
    """``ros2 bag play BAG --clock --rate RATE [--loop]``."""
    cmd = ['ros2', 'bag', 'play', LaunchConfiguration('bag').perform(context), '--clock',
           '--rate', LaunchConfiguration('rate').perform(context)]
    if LaunchConfiguration('loop').perform(context).lower() in ('true', '1'):
        cmd.append('--loop')
    return [ExecuteProcess(cmd=cmd, name='bag_play', output='screen')]


def generate_launch_description():
    share = get_package_share_directory('lane_seg')
    fastdds_profile = os.path.join(share, 'config', 'fastdds_large_images.xml')
    lane_params = os.path.join(share, 'config', 'lane_seg.yaml')
    flow_params = os.path.join(share, 'config', 'flow.yaml')
    rviz_config = os.path.join(share, 'config', 'lane_seg.rviz')
    backend = ParameterValue(LaunchConfiguration('backend'), value_type=str)
    camera_qos = ParameterValue(LaunchConfiguration('camera_qos'), value_type=str)
    lane_model = ParameterValue(LaunchConfiguration('lane_model'), value_type=str)
    flow_model = ParameterValue(LaunchConfiguration('flow_model'), value_type=str)
    lane_cpus = ParameterValue(LaunchConfiguration('lane_cpus'), value_type=str)
    flow_cpus = ParameterValue(LaunchConfiguration('flow_cpus'), value_type=str)
    return LaunchDescription([
        DeclareLaunchArgument('large_image_transport', default_value='true',
                              description='Fast DDS profile config/fastdds_large_images.xml '
                                          '(32 MB shared-memory segment: 800x600 frames at 30 '
                                          'Hz) for every process this launch starts'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', fastdds_profile,
                               condition=IfCondition(LaunchConfiguration(
                                   'large_image_transport'))),
        DeclareLaunchArgument('bag', description='bag to replay (folder or .mcap/.db3)'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback rate'),
        DeclareLaunchArgument('loop', default_value='false', description='replay forever'),
        DeclareLaunchArgument('camera_topic', default_value='/carla/ego_vehicle/rgb_front/image',
                              description='camera image topic in the bag'),
        DeclareLaunchArgument('camera_info_topic',
                              default_value='/carla/ego_vehicle/rgb_front/camera_info',
                              description='camera info topic in the bag'),
        DeclareLaunchArgument('camera_qos', default_value='reliable',
                              description='reliability of the camera subscriptions: reliable '
                                          '(the CARLA bridge and ros2 bag play publish '
                                          'reliable; large frames arrive whole) or '
                                          'best_effort (cameras that publish sensor-data QoS)'),
        DeclareLaunchArgument('backend', default_value='auto',
                              description='auto, onnxruntime, tensorrt or torch'),
        DeclareLaunchArgument('lane_model', default_value='',
                              description='lane model path; empty: the shipped int8 model'),
        DeclareLaunchArgument('flow_model', default_value='',
                              description='flow model path; empty: the shipped int8 model'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start RViz with config/lane_seg.rviz'),
        DeclareLaunchArgument('lane_cpus', default_value='',
                              description="lane_seg_node's cpu_affinity (e.g. 0); empty: any"),
        DeclareLaunchArgument('flow_cpus', default_value='',
                              description="flow_node's cpu_affinity (e.g. 1); empty: any"),
        Node(package='lane_seg', executable='lane_seg_node', name='lane_seg_node',
             parameters=[lane_params, {'backend': backend, 'qos_reliability': camera_qos,
                                       'model_path': lane_model, 'cpu_affinity': lane_cpus,
                                       'use_sim_time': True}],
             remappings=[('image', LaunchConfiguration('camera_topic')),
                         ('camera_info', LaunchConfiguration('camera_info_topic'))],
             output='screen'),
        Node(package='lane_seg', executable='flow_node', name='flow_node',
             parameters=[flow_params, {'backend': backend, 'qos_reliability': camera_qos,
                                       'model_path': flow_model, 'cpu_affinity': flow_cpus,
                                       'use_sim_time': True}],
             remappings=[('image', LaunchConfiguration('camera_topic'))],
             output='screen'),
        OpaqueFunction(function=_bag_play),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             arguments=['-d', rviz_config], parameters=[{'use_sim_time': True}],
             condition=IfCondition(LaunchConfiguration('rviz'))),
    ])
