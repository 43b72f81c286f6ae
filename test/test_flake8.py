"""
Code style: ament_flake8 over the package, as ``ros2 pkg create`` sets it up.

ament_flake8 runs flake8 with its own configuration
(``ament_flake8/configuration/ament_flake8.ini``: line length 99, Google
import order, single quotes, docstring checks with the ament ignore list) and
with every flake8 plugin installed next to it (flake8-quotes,
flake8-import-order, flake8-docstrings, flake8-builtins,
flake8-comprehensions). It does *not* read the ``[flake8]`` section of
``setup.cfg``.

The check runs from the package root whatever directory pytest was started
from, because ament_flake8 lints the current directory. Folders starting with
``.`` or ``_`` (``.venv``, ``__pycache__``) are skipped by ament_flake8
itself; colcon and demo output folders inside the checkout are skipped here.
"""

from pathlib import Path

from ament_flake8.main import main_with_errors
import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# Output of `colcon build` / `make demo` run inside the checkout: copies of the
# sources (build/, install/) or generated files, never code to lint.
NOT_SOURCES = ('build', 'install', 'log', 'out')


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8(monkeypatch):
    monkeypatch.chdir(PACKAGE_ROOT)
    excludes = [str(PACKAGE_ROOT / name) for name in NOT_SOURCES
                if (PACKAGE_ROOT / name).is_dir()]
    argv = ['--exclude', *excludes] if excludes else []
    rc, errors = main_with_errors(argv=argv)
    assert rc == 0, \
        'Found %d code style errors / warnings:\n' % len(errors) + \
        '\n'.join(errors)
