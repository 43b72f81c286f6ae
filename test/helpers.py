"""
Small helpers shared by the test modules: tiny model configs, a silent log, a ROS domain.

Plain values and functions (no torch, no rclpy at import), imported as ``from helpers import
...`` like ``engine_models``; the fixtures built on them live in ``conftest.py``.
"""

import contextlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]   # the package's source tree

# A 1-level fast U-Net of base width 4 and a 3-level FlowNetS at width 1/16: each training or
# export run on them takes a fraction of a second. Copy before changing (``dict(TINY)``).
TINY = {'levels': 1, 'base': 4, 'variant': 'fast', 'separable': False}
FLOW = {'width': 0.0625, 'levels': 3}


def quiet(_message):
    """Swallow a training log line."""


@contextlib.contextmanager
def ros_domain_env(domain_id):
    """
    Run the body in ROS domain ``domain_id``, discovery limited to this host.

    ``ROS_DOMAIN_ID`` and ``ROS_AUTOMATIC_DISCOVERY_RANGE`` are set in ``os.environ`` (so
    subprocesses inherit them) and put back as they were afterwards.
    """
    keys = ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')
    saved = {key: os.environ.get(key) for key in keys}
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny_cache(path):
    """Build the 4-frame cache of the synthetic drive (seeds 1, 2; 2 frames; 96x128) at path."""
    from lane_seg.train.cache import build_cache
    return build_cache(path, seeds=[1, 2], frames=2, height=96, width=128, progress=False)


def docs_script(name):
    """Import ``docs/scripts/<name>.py`` (the study scripts are not a package) as a module."""
    import importlib.util
    path = REPO / 'docs' / 'scripts' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def thread_nice(native_id):
    """Return the niceness of one thread (Linux: niceness is per thread)."""
    return os.getpriority(os.PRIO_PROCESS, native_id)
