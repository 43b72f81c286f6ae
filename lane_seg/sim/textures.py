"""Tileable procedural textures (1/f noise through an inverse FFT), sampled in world units."""

import cv2
import numpy as np


def fractal_noise(rng: np.random.Generator, size: int = 256, beta: float = 1.6) -> np.ndarray:
    """Seamlessly tileable noise in [0, 1] with a 1/f^beta spectrum, float32 (size, size)."""
    fx = np.fft.fftfreq(size)[None, :]
    fy = np.fft.fftfreq(size)[:, None]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = f ** (-beta) * np.exp(2j * np.pi * rng.random((size, size)))
    spectrum[0, 0] = 0.0
    noise = np.fft.ifft2(spectrum).real
    noise -= noise.min()
    noise /= max(float(noise.max()), 1e-9)
    return noise.astype(np.float32)


def fold(values: np.ndarray, cols: int = 1024) -> np.ndarray:
    """Pad a flat array (N, ...) and fold it to (rows, cols, ...) for OpenCV's size limits."""
    n = values.shape[0]
    rows = max(1, -(-n // cols))
    pad = [(0, rows * cols - n)] + [(0, 0)] * (values.ndim - 1)
    return np.pad(values, pad).reshape((rows, cols) + values.shape[1:])


def sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray, texel_m: float) -> np.ndarray:
    """
    Bilinear, wrapped lookup of ``texture`` at world coordinates (u, v) in metres.

    ``u`` and ``v`` are arrays of the same shape (any size); the result has that shape.
    """
    shape = np.shape(u)
    size_u, size_v = texture.shape[1], texture.shape[0]
    mu = fold(np.mod(np.ravel(u) / texel_m, size_u).astype(np.float32))
    mv = fold(np.mod(np.ravel(v) / texel_m, size_v).astype(np.float32))
    out = cv2.remap(texture, mu, mv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    return out.reshape(-1)[:int(np.prod(shape))].reshape(shape)
