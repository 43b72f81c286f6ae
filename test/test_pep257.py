"""
Docstrings: ament_pep257 over the package, as ``ros2 pkg create`` sets it up.

ament_pep257 runs pydocstyle with the "ament" convention (PEP 257 minus
D100-D107, D203, D212 and D404) on every ``.py`` file under the package root,
skipping folders whose name starts with ``.`` or ``_``. The check runs from
the package root whatever directory pytest was started from; colcon and demo
output folders inside the checkout are excluded.
"""

from pathlib import Path

from ament_pep257.main import main
import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# Output of `colcon build` / `make demo` run inside the checkout.
NOT_SOURCES = ('build', 'install', 'log', 'out')


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257(monkeypatch, capsys):
    monkeypatch.chdir(PACKAGE_ROOT)
    excludes = [str(PACKAGE_ROOT / name) for name in NOT_SOURCES
                if (PACKAGE_ROOT / name).is_dir()]
    # ros2 pkg create passes ['.', 'test'], which checks test/ twice ('./test/x.py'
    # and 'test/x.py') and so reports each of its errors twice: '.' covers test/.
    argv = ['.']
    if excludes:
        argv += ['--exclude', *excludes]
    rc = main(argv=argv)
    captured = capsys.readouterr()
    assert rc == 0, 'Found code style errors / warnings:\n' + captured.err
