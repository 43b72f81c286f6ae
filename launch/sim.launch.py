"""
The synthetic drive through both perception nodes: ``ros2 launch lane_seg sim.launch.py``.

``camera_sim_node`` publishes the synthetic camera on the CARLA bridge's topics (and the
ground truth, which the nodes use for live IoU / EPE); ``lane_seg_node`` and ``flow_node``
subscribe to it. Parameters come from ``config/sim.yaml``. Arguments: ``backend``,
``lane_model``, ``flow_model``, ``use_sim_time``, ``rviz``, ``large_image_transport`` (the Fast
DDS profile ``config/fastdds_large_images.xml`` for all three processes; default true),
``lane_cpus`` and ``flow_cpus`` (the nodes' ``cpu_affinity``: on 2 cores ``lane_cpus:=0
flow_cpus:=1`` gives each node its core; default: any CPU).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

CAMERA = '/carla/ego_vehicle/rgb_front'


def generate_launch_description():
    share = get_package_share_directory('lane_seg')
    fastdds_profile = os.path.join(share, 'config', 'fastdds_large_images.xml')
    params = os.path.join(share, 'config', 'sim.yaml')
    rviz_config = os.path.join(share, 'config', 'lane_seg.rviz')
    use_sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    backend = ParameterValue(LaunchConfiguration('backend'), value_type=str)
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
        DeclareLaunchArgument('backend', default_value='auto',
                              description='auto, onnxruntime, tensorrt or torch'),
        DeclareLaunchArgument('lane_model', default_value='',
                              description='lane model path; empty: the shipped int8 model'),
        DeclareLaunchArgument('flow_model', default_value='',
                              description='flow model path; empty: the shipped int8 model'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='follow /clock'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start RViz with config/lane_seg.rviz'),
        DeclareLaunchArgument('lane_cpus', default_value='',
                              description="lane_seg_node's cpu_affinity (e.g. 0); empty: any"),
        DeclareLaunchArgument('flow_cpus', default_value='',
                              description="flow_node's cpu_affinity (e.g. 1); empty: any"),
        Node(package='lane_seg', executable='camera_sim_node', name='camera_sim_node',
             parameters=[params, {'use_sim_time': use_sim_time}], output='screen'),
        Node(package='lane_seg', executable='lane_seg_node', name='lane_seg_node',
             parameters=[params, {'backend': backend, 'model_path': lane_model,
                                  'cpu_affinity': lane_cpus, 'use_sim_time': use_sim_time}],
             remappings=[('image', CAMERA + '/image'),
                         ('camera_info', CAMERA + '/camera_info')],
             output='screen'),
        Node(package='lane_seg', executable='flow_node', name='flow_node',
             parameters=[params, {'backend': backend, 'model_path': flow_model,
                                  'cpu_affinity': flow_cpus, 'use_sim_time': use_sim_time}],
             remappings=[('image', CAMERA + '/image')],
             output='screen'),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             arguments=['-d', rviz_config], parameters=[{'use_sim_time': use_sim_time}],
             condition=IfCondition(LaunchConfiguration('rviz'))),
    ])
