"""Rendering speed of the synthetic drive (``lane-seg sim bench``)."""

import os
import platform
import time

import numpy as np

from .drive import DriveConfig, SyntheticDrive


def bench_render(height: int, width: int, frames: int = 30, seeds: int = 3) -> dict:
    """
    Frames per second of the full frame (image, lane and paint masks, flow + validity).

    Each seed's drive is warmed up by one frame; the time covers ``frames`` further frames.
    """
    per_seed = []
    for seed in range(seeds):
        drive = SyntheticDrive(DriveConfig.sized(seed, height, width))
        it = drive.frames(frames + 1)
        next(it)
        t0 = time.perf_counter()
        for _ in it:
            pass
        per_seed.append(frames / (time.perf_counter() - t0))
    return {
        'size': f'{height}x{width}', 'frames_per_seed': frames, 'seeds': seeds,
        'fps_mean': round(float(np.mean(per_seed)), 2),
        'fps_min': round(float(np.min(per_seed)), 2),
        'ms_per_frame': round(1000.0 / float(np.mean(per_seed)), 1),
        'machine': {'cpu': _cpu_name(), 'cores': os.cpu_count(),
                    'python': platform.python_version(), 'numpy': np.__version__},
    }


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'
