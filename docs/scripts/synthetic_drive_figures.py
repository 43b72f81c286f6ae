"""
Make the synthetic-drive figures of README.md and docs/synthetic_drive.md.

Run from the repository root: ``.venv/bin/python docs/scripts/synthetic_drive_figures.py``.
"""

import cv2
from lane_seg.demo import panel
from lane_seg.flow.viz import color_wheel_legend
from lane_seg.sim import CameraConfig, DriveConfig, SyntheticDrive, WorldConfig
import numpy as np


def main():
    frame = SyntheticDrive(DriveConfig.sized(11, 256, 512)).frame(40)
    cv2.imwrite('docs/images/synthetic_drive.png', panel(frame, max_flow=20.0))
    cv2.imwrite('docs/images/flow_legend.png', color_wheel_legend(129))
    tiles = []
    for seed, weather in [(1, 'clear'), (2, 'dusk'), (3, 'fog'), (4, 'wet'), (5, 'overcast')]:
        cfg = DriveConfig(seed=seed, camera=CameraConfig(width=384, height=192),
                          world=WorldConfig(seed=seed, weather=weather, vehicles=8))
        tiles.append(SyntheticDrive(cfg).frame(60).image)
    cv2.imwrite('docs/images/weathers.png', np.concatenate(tiles, axis=1))


if __name__ == '__main__':
    main()
