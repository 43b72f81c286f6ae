"""
A decoded-frame cache of the synthetic drive for fast training (numpy memory maps).

Rendering costs ~0.1 s a frame; an epoch over a cache costs nothing. ``build_cache`` renders
``seeds`` x ``frames`` frames once into ``DIR/{images,masks,flow,valid}.npy`` (uint8, uint8,
float16, bool) plus ``DIR/index.json``; ``FrameCache`` memory-maps them.
"""

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..sim import DriveConfig, SyntheticDrive


def build_cache(out, seeds, frames: int, height: int = 384, width: int = 512,
                stride: int = 2, progress: bool = True) -> Path:
    """Render every ``stride``-th frame pair of each seed's drive into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(seeds) * frames
    images = np.lib.format.open_memmap(out / 'images.npy', 'w+', np.uint8, (n, height, width, 3))
    nexts = np.lib.format.open_memmap(out / 'next.npy', 'w+', np.uint8, (n, height, width, 3))
    masks = np.lib.format.open_memmap(out / 'masks.npy', 'w+', np.uint8, (n, height, width))
    flows = np.lib.format.open_memmap(out / 'flow.npy', 'w+', np.float16,
                                      (n, height, width, 2))
    valid = np.lib.format.open_memmap(out / 'valid.npy', 'w+', np.bool_, (n, height, width))
    bar = tqdm(total=n, desc=f'cache {out.name}', unit='frame', disable=not progress)
    i = 0
    for seed in seeds:
        drive = SyntheticDrive(DriveConfig.sized(int(seed), height, width))
        start = (int(seed) * 37) % 300
        frames_iter = drive.frames(frames * stride + 1, start=start)
        prev = next(frames_iter)
        for k in range(frames * stride):
            nxt = next(frames_iter)
            if k % stride == 0:
                images[i], nexts[i], masks[i] = prev.image, nxt.image, prev.lane_mask
                flows[i], valid[i] = prev.flow.astype(np.float16), prev.flow_valid
                i += 1
                bar.update(1)
            prev = nxt
    bar.close()
    for arr in (images, nexts, masks, flows, valid):
        arr.flush()
    (out / 'index.json').write_text(json.dumps(
        {'seeds': [int(s) for s in seeds], 'frames_per_seed': frames, 'stride': stride,
         'size': [height, width], 'count': n}, indent=2))
    return out


class Samples:
    """
    Training samples from ``KIND:PATH``: a frame cache (``cache:DIR``) or a data set on disk.

    Several sources separated by commas (``cache:A,cache:B,folder:C``) are concatenated in that
    order. Subclasses name their data-set formats in ``kinds``, open them in ``open_dataset``
    and turn a cache index or a data-set item into a sample in ``from_cache`` / ``from_item``.
    """

    kinds = ()

    def __init__(self, spec: str):
        self.sources = [self._open(part.strip()) for part in str(spec).split(',')]
        self._ends = np.cumsum([len(source) for source in self.sources])

    def _open(self, spec: str):
        kind, _, path = spec.partition(':')
        if not path:
            raise ValueError(f'data {spec!r} must be KIND:PATH '
                             f"({', '.join(('cache',) + self.kinds)})")
        if kind == 'cache':
            return FrameCache(path)
        if kind not in self.kinds:
            raise ValueError(f'data {spec!r}: unknown kind {kind!r} '
                             f"(one of {', '.join(('cache',) + self.kinds)})")
        return self.open_dataset(path, kind)

    def __len__(self):
        return int(self._ends[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f'sample {i} out of range ({len(self)} samples)')
        k = int(np.searchsorted(self._ends, i, side='right'))
        source = self.sources[k]
        j = i - (int(self._ends[k - 1]) if k else 0)
        if isinstance(source, FrameCache):
            return self.from_cache(source, j)
        return self.from_item(source[j])


class FrameCache:
    """Memory-mapped view of a cache written by ``build_cache``."""

    def __init__(self, root):
        self.root = Path(root)
        index = self.root / 'index.json'
        # index.json is written last: without it the cache is still being built (usable up to
        # the frames already rendered, e.g. with --max-train).
        self.index = json.loads(index.read_text()) if index.exists() else {'complete': False}
        load = lambda name: np.load(self.root / f'{name}.npy', mmap_mode='r')  # noqa: E731
        self.images, self.next = load('images'), load('next')
        self.masks, self.flow, self.valid = load('masks'), load('flow'), load('valid')

    def __len__(self):
        return self.images.shape[0]
