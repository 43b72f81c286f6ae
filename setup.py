"""ament_python package set-up for lane_seg (also installs with plain pip)."""

from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'lane_seg'


def _files(pattern):
    return sorted(path for path in glob(pattern) if os.path.isfile(path))


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', _files('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', _files('config/*')),
        ('share/' + PACKAGE + '/models', _files('models/*')),
    ],
    package_data={PACKAGE: ['py.typed']},
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='lane_seg maintainers',
    maintainer_email='maintainers@lane-seg.dev',
    description='Int8 lane segmentation and quantized optical flow for ROS 2.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'lane-seg = lane_seg.cli:main',
            'lane_seg_node = lane_seg.ros.lane_seg_node:main',
            'flow_node = lane_seg.ros.flow_node:main',
            'camera_sim_node = lane_seg.ros.camera_sim_node:main',
            'carla_camera_node = lane_seg.carla.client_node:main',
        ],
    },
)
