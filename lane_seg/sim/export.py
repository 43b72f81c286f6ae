"""Write a synthetic drive to disk in the package's folder layout (``lane-seg sim export``)."""

from pathlib import Path

from tqdm import tqdm

from .drive import DriveConfig, SyntheticDrive
from ..data.folder import FolderWriter


def export_drive(out, frames: int, seed: int = 0, height: int = 256, width: int = 512,
                 start: int = 0, flow: bool = True, markings: bool = True,
                 progress: bool = True, **drive_kwargs) -> dict:
    """
    Render ``frames`` frames of drive ``seed`` into ``out``; returns a summary dict.

    Frame K's flow (``flow/K.flo``) goes to frame K+1; the last frame has no flow (its
    successor is not written), so a folder of N frames holds N-1 flow fields.
    """
    if frames < 1:
        raise ValueError(f'frames={frames} must be >= 1')
    cfg = DriveConfig.sized(seed, height, width, **drive_kwargs)
    drive = SyntheticDrive(cfg)
    writer = FolderWriter(out)
    camera = dict(drive.intrinsics.as_dict(), frame_id='ego_vehicle/rgb_front',
                  source=f'lane_seg synthetic drive seed={seed}',
                  fov_deg=cfg.camera.fov_deg, mount_height=cfg.camera.mount_height,
                  pitch_deg=cfg.camera.pitch_deg, fps=cfg.fps, weather=drive.weather.name,
                  lanes=drive.road.lanes)
    writer.write_camera(camera)
    it = drive.frames(frames, start=start)
    if progress:
        it = tqdm(it, total=frames, desc=f'export seed {seed}', unit='frame')
    for n, frame in enumerate(it):
        last = n == frames - 1
        writer.write(frame.index, image=frame.image, mask=frame.lane_mask,
                     markings=frame.marking_mask if markings else None,
                     flow=None if (last or not flow) else frame.flow,
                     flow_valid=None if (last or not flow) else frame.flow_valid)
    return {'out': str(Path(out)), 'frames': frames, 'seed': seed, 'start': start,
            'size': [height, width], 'weather': drive.weather.name, 'lanes': drive.road.lanes}
