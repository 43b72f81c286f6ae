"""
Where the package's installed files are: the share directory and the shipped models.

The share directory is, in order: the ament index's (``colcon build`` / a ROS install), then
``sys.prefix/share/lane_seg`` (``pip install .``), then the source checkout (the folder with
``package.xml`` above this package: ``pip install -e .`` or running from the clone).
"""

from pathlib import Path
import sys

PACKAGE = 'lane_seg'
MODEL_STEMS = {'lane_segmentation': 'lane_unet', 'lanes': 'lane_unet', 'lane': 'lane_unet',
               'optical_flow': 'flow', 'flow': 'flow'}
PRECISIONS = ('int8', 'fp32', 'mixed')   # mixed: learned per-layer widths in int8 containers


class ResourceError(FileNotFoundError):
    """A package file (a shipped model) is not where the installation should have put it."""


def _ament_share():
    try:
        from ament_index_python.packages import (get_package_share_directory,
                                                 PackageNotFoundError)
    except ImportError:
        return None
    try:
        return Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, ValueError, LookupError, OSError):
        # OSError: AMENT_PREFIX_PATH unset (no ROS environment sourced)
        return None


def _checkout_root():
    root = Path(__file__).resolve().parent.parent
    return root if (root / 'package.xml').exists() else None


def share_dirs() -> list:
    """Candidate share directories, most specific first (only those that exist)."""
    found = []
    for path in (_ament_share(), Path(sys.prefix) / 'share' / PACKAGE, _checkout_root()):
        if path is not None and path.is_dir() and path not in found:
            found.append(path)
    return found


def share_dir() -> Path:
    """Return the package's share directory (the module docstring gives the search order)."""
    dirs = share_dirs()
    if not dirs:
        raise ResourceError(f'no share directory for {PACKAGE}: not in the ament index, not '
                            f'in {sys.prefix}/share and not run from a source checkout')
    return dirs[0]


def model_filename(task: str, precision: str = 'int8', backend: str = 'onnxruntime') -> str:
    """File name of a shipped model: int8 is the ORT form, or the QDQ form for TensorRT."""
    stem = MODEL_STEMS.get(task)
    if stem is None:
        raise ValueError(f'task {task!r} not one of {sorted(MODEL_STEMS)}')
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} not one of {PRECISIONS}')
    if precision == 'fp32':
        return f'{stem}_fp32.onnx'
    if precision == 'mixed':
        stem += '_mixed'
    return f'{stem}_int8_qdq.onnx' if backend == 'tensorrt' else f'{stem}_int8_ort.onnx'


def shipped_model(task: str, precision: str = 'int8', backend: str = 'onnxruntime') -> Path:
    """
    Path of a shipped model (``models/`` in the share directory).

    ``task``: 'lanes' or 'flow' (or the metadata task names); ``precision``: 'int8',
    'fp32' or 'mixed' (learned per-layer widths in int8 containers, both tasks). Raises
    ResourceError naming every place looked in when the file is missing.
    """
    name = model_filename(task, precision, backend)
    dirs = share_dirs()
    for base in dirs:
        path = base / 'models' / name
        if path.exists():
            return path
    looked = ', '.join(str(d / 'models') for d in dirs) or '(no share directory found)'
    raise ResourceError(f'shipped model {name} not found (looked in {looked}); build the '
                        'models (see README, "Models") and reinstall, or pass a model path')


# Forms of one model, by file-name suffix: 'int8_qdq' (TensorRT), 'int8_ort' (ONNX Runtime,
# u8s8 kernels), 'int8_u8u8' (ONNX Runtime, exact without VNNI), 'fp32'.
MODEL_FORMS = ('int8_qdq', 'int8_ort', 'int8_u8u8', 'fp32')
ORT_INT8_FORMS = ('int8_ort', 'int8_u8u8')


def model_form(path):
    """Return the form a model file's name says (one of MODEL_FORMS), or None."""
    stem = Path(path).stem
    return next((f for f in MODEL_FORMS if stem.endswith(f'_{f}')), None)


def form_path(path, form: str):
    """Return the path of the same model in another form (existing or not), or None."""
    path = Path(path)
    current = model_form(path)
    if current is None:
        return None
    return path.with_name(path.stem[:-len(current)] + form + path.suffix)


def sibling_model(path, form: str):
    """Return the same model in another form (see MODEL_FORMS) where it exists, or None."""
    other = form_path(path, form)
    return other if other is not None and other.exists() else None
