"""
Lanes and flow next to the CARLA ROS bridge: ``ros2 launch lane_seg carla.launch.py``.

Subscribes to the bridge's front RGB camera (``camera_topic``, default
``/carla/ego_vehicle/rgb_front/image``, and its ``camera_info``). ``rviz:=true`` starts RViz
with the shipped configuration; ``carla_bridge:=true`` also starts the bridge with its example
ego vehicle (``carla_ros_bridge_with_example_ego_vehicle.launch.py``) when ``carla_ros_bridge``
is installed. ``lane_gt_topic`` may name the bridge's semantic camera (CityScapes palette) for
live IoU. ``lane_cpus`` and ``flow_cpus`` set the nodes' ``cpu_affinity`` (default: any CPU;
leave the CARLA server and the bridge cores of their own). Parameters come from
``config/lane_seg.yaml`` and ``config/flow.yaml``.
"""

import os

from ament_index_python.packages import get_package_share_directory, PackageNotFoundError
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, IncludeLaunchDescription, LogInfo,
                            OpaqueFunction, SetEnvironmentVariable)
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

BRIDGE_LAUNCH = 'carla_ros_bridge_with_example_ego_vehicle.launch.py'


def _carla_bridge(context):
    """Include the CARLA bridge's launch when asked for and installed."""
    if LaunchConfiguration('carla_bridge').perform(context).lower() not in ('true', '1'):
        return []
    try:
        share = get_package_share_directory('carla_ros_bridge')
    except PackageNotFoundError:
        return [LogInfo(msg='carla_bridge:=true but carla_ros_bridge is not installed; '
                            'start the bridge yourself')]
    args = {'host': LaunchConfiguration('host'), 'port': LaunchConfiguration('port'),
            'town': LaunchConfiguration('town'), 'timeout': LaunchConfiguration('timeout')}
    return [IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, BRIDGE_LAUNCH)),
        launch_arguments=args.items())]


def generate_launch_description():
    share = get_package_share_directory('lane_seg')
    fastdds_profile = os.path.join(share, 'config', 'fastdds_large_images.xml')
    lane_params = os.path.join(share, 'config', 'lane_seg.yaml')
    flow_params = os.path.join(share, 'config', 'flow.yaml')
    rviz_config = os.path.join(share, 'config', 'lane_seg.rviz')
    use_sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    backend = ParameterValue(LaunchConfiguration('backend'), value_type=str)
    camera_qos = ParameterValue(LaunchConfiguration('camera_qos'), value_type=str)
    lane_model = ParameterValue(LaunchConfiguration('lane_model'), value_type=str)
    flow_model = ParameterValue(LaunchConfiguration('flow_model'), value_type=str)
    lane_cpus = ParameterValue(LaunchConfiguration('lane_cpus'), value_type=str)
    flow_cpus = ParameterValue(LaunchConfiguration('flow_cpus'), value_type=str)
    lane_gt = ParameterValue(LaunchConfiguration('lane_gt_topic'), value_type=str)
    return LaunchDescription([
        DeclareLaunchArgument('large_image_transport', default_value='false',
                              description='Fast DDS profile config/fastdds_large_images.xml '
                                          '(32 MB shared-memory segment: 800x600 frames at 30 '
                                          'Hz) for every process this launch starts'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', fastdds_profile,
                               condition=IfCondition(LaunchConfiguration(
                                   'large_image_transport'))),
        DeclareLaunchArgument('camera_topic', default_value='/carla/ego_vehicle/rgb_front/image',
                              description='camera image topic (the CARLA bridge front RGB)'),
        DeclareLaunchArgument('camera_info_topic',
                              default_value='/carla/ego_vehicle/rgb_front/camera_info',
                              description='camera info topic'),
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
        DeclareLaunchArgument('lane_gt_topic', default_value='',
                              description='optional ground-truth lanes (mono8 or the '
                                          "bridge's semantic palette image) for live IoU"),
        DeclareLaunchArgument('use_sim_time', default_value='true',
                              description='follow /clock (the bridge publishes it)'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start RViz with config/lane_seg.rviz'),
        DeclareLaunchArgument('lane_cpus', default_value='',
                              description="lane_seg_node's cpu_affinity (e.g. 0); empty: any"),
        DeclareLaunchArgument('flow_cpus', default_value='',
                              description="flow_node's cpu_affinity (e.g. 1); empty: any"),
        DeclareLaunchArgument('carla_bridge', default_value='false',
                              description='also launch carla_ros_bridge (when installed)'),
        DeclareLaunchArgument('host', default_value='localhost', description='CARLA host'),
        DeclareLaunchArgument('port', default_value='2000', description='CARLA port'),
        DeclareLaunchArgument('town', default_value='Town01', description='CARLA town'),
        DeclareLaunchArgument('timeout', default_value='10', description='CARLA timeout (s)'),
        OpaqueFunction(function=_carla_bridge),
        Node(package='lane_seg', executable='lane_seg_node', name='lane_seg_node',
             parameters=[lane_params, {'backend': backend, 'qos_reliability': camera_qos,
                                       'model_path': lane_model, 'cpu_affinity': lane_cpus,
                                       'gt_topic': lane_gt, 'use_sim_time': use_sim_time}],
             remappings=[('image', LaunchConfiguration('camera_topic')),
                         ('camera_info', LaunchConfiguration('camera_info_topic'))],
             output='screen'),
        Node(package='lane_seg', executable='flow_node', name='flow_node',
             parameters=[flow_params, {'backend': backend, 'qos_reliability': camera_qos,
                                       'model_path': flow_model, 'cpu_affinity': flow_cpus,
                                       'use_sim_time': use_sim_time}],
             remappings=[('image', LaunchConfiguration('camera_topic'))],
             output='screen'),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             arguments=['-d', rviz_config], parameters=[{'use_sim_time': use_sim_time}],
             condition=IfCondition(LaunchConfiguration('rviz'))),
    ])
