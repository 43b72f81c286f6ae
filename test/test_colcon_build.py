"""
The package builds with colcon in a fresh workspace and lands in the ament index.

The checkout (its top-level files and the folders that setup.py installs:
resource/, lane_seg/, launch/, config/, models/) is copied to
``<tmp>/ws/src/lane_seg``, without caches and egg-info, and built with the
``colcon`` next to the running Python, in colcon's default isolated layout.
The test then checks what ``ros2 run`` / ``ros2 launch`` rely on:

* colcon identified the package as ``ros.ament_python`` (from its log) and
  wrote the ament_python environment hooks (AMENT_PREFIX_PATH, PYTHONPATH);
* with ``AMENT_PREFIX_PATH=<install>/lane_seg`` prepended, ament_index_python
  finds the package: its share directory holds package.xml (same bytes as the
  source) and ``<prefix>/lib/lane_seg/lane-seg`` is an executable console
  script (setup.cfg's ``install_scripts`` puts it there);
* with the install tree's site-packages on PYTHONPATH (what the hook adds),
  ``import lane_seg`` loads the installed copy, ``lane-seg --help`` runs, and
  the installed distribution's name and version are package.xml's;
* every module under lane_seg/ and every file under launch/, config/ and
  models/ was installed (a folder without ``__init__.py``, a launch file not
  named ``*.launch.py`` or a config subfolder would be silently left out).
"""

from email.parser import Parser
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

from catkin_pkg.package import parse_package
import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = 'lane_seg'
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120

# Folders installed by setup.py; every top-level file is copied as well.
PACKAGE_FOLDERS = ('resource', 'lane_seg', 'launch', 'config', 'models')
# Never copied, at any depth. The checkout's own .venv, .git, build, install,
# log and out folders are left out by copying only PACKAGE_FOLDERS.
IGNORED = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info', '.pytest_cache')

INDEX_SCRIPT = """
from email.parser import Parser
import json
import sys

from ament_index_python.packages import get_package_prefix
from ament_index_python.packages import get_package_share_directory

import lane_seg

json.dump({
    'prefix': get_package_prefix(sys.argv[1]),
    'share': get_package_share_directory(sys.argv[1]),
    'module': lane_seg.__file__,
}, sys.stdout)
"""


def _colcon():
    colcon = Path(sys.executable).parent / 'colcon'
    if colcon.is_file():
        return str(colcon)
    found = shutil.which('colcon')
    assert found, 'colcon is not installed next to %s nor on PATH ' \
        '(pip install -r requirements/dev.txt)' % sys.executable
    return found


def _copy_package(destination):
    destination.mkdir(parents=True)
    for entry in sorted(PACKAGE_ROOT.iterdir()):
        if entry.is_file() and not entry.name.endswith('.pyc'):
            shutil.copy2(entry, destination / entry.name)
        elif entry.is_dir() and entry.name in PACKAGE_FOLDERS:
            shutil.copytree(entry, destination / entry.name, ignore=IGNORED)


def _prepend(env, name, value):
    env[name] = os.pathsep.join(p for p in (str(value), env.get(name, '')) if p)


def _python_path_hook(share):
    """Return the PYTHONPATH entry of colcon's pythonpath.dsv hook."""
    for line in (share / 'hook' / 'pythonpath.dsv').read_text().splitlines():
        kind, variable, value = line.split(';', 2)
        if variable == 'PYTHONPATH':
            return value
    raise AssertionError('no PYTHONPATH entry in %s' % (share / 'hook' / 'pythonpath.dsv'))


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Build the package in a fresh colcon workspace; return the workspace path."""
    ws = tmp_path_factory.mktemp('colcon') / 'ws'
    _copy_package(ws / 'src' / PACKAGE)
    env = dict(os.environ)
    env['COLCON_HOME'] = str(ws / 'colcon_home')  # no user defaults.yaml
    command = [
        _colcon(), 'build',
        '--base-paths', 'src', '--build-base', 'build', '--install-base', 'install',
        '--event-handlers', 'console_direct+']
    try:
        result = subprocess.run(
            command, cwd=ws, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:  # its output is bytes on POSIX
        output = [o.decode(errors='replace') if isinstance(o, bytes) else o or ''
                  for o in (error.stdout, error.stderr)]
        pytest.fail('colcon build ran past %d s:\n%s\n%s' % (BUILD_TIMEOUT_S, *output))
    output = '$ %s\n%s\n%s' % (' '.join(command), result.stdout, result.stderr)
    assert result.returncode == 0, 'colcon build failed:\n' + output
    assert 'Finished <<< %s' % PACKAGE in result.stdout + result.stderr, output
    return ws


@pytest.fixture(scope='module')
def install_env(workspace):
    """Return the environment sourcing <install>/lane_seg would give."""
    prefix = workspace / 'install' / PACKAGE
    env = dict(os.environ)
    _prepend(env, 'AMENT_PREFIX_PATH', prefix)
    _prepend(env, 'PYTHONPATH', prefix / _python_path_hook(prefix / 'share' / PACKAGE))
    return env


@pytest.mark.slow
def test_colcon_builds_it_as_ament_python(workspace):
    logs = sorted((workspace / 'log').glob('build_*/logger_all.log'))
    assert logs, 'colcon wrote no logger_all.log under %s' % (workspace / 'log')
    log = logs[-1].read_text()
    assert "with type 'ros.ament_python' and name '%s'" % PACKAGE in log, \
        'colcon did not identify the package as ros.ament_python:\n' + log
    hooks = workspace / 'install' / PACKAGE / 'share' / PACKAGE / 'hook'
    for hook in ('ament_prefix_path.dsv', 'pythonpath.dsv'):
        assert (hooks / hook).is_file(), '%s not installed' % (hooks / hook)


@pytest.mark.slow
def test_ament_index_finds_the_installed_package(workspace, install_env, tmp_path):
    result = subprocess.run(
        [sys.executable, '-c', INDEX_SCRIPT, PACKAGE], cwd=tmp_path, env=install_env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)

    prefix = (workspace / 'install' / PACKAGE).resolve()
    assert Path(found['prefix']).resolve() == prefix
    share = Path(found['share'])
    assert share.resolve() == prefix / 'share' / PACKAGE
    assert (share / 'package.xml').read_bytes() == (PACKAGE_ROOT / 'package.xml').read_bytes()
    assert Path(found['module']).resolve().is_relative_to(prefix), \
        'import lane_seg loaded %s, not the installed copy' % found['module']

    script = Path(found['prefix']) / 'lib' / PACKAGE / 'lane-seg'
    assert script.is_file(), 'ros2 run looks for executables in %s: %s' % (
        script.parent, sorted(p.name for p in script.parent.iterdir())
        if script.parent.is_dir() else 'missing')
    assert os.access(script, os.X_OK), '%s is not executable' % script


@pytest.mark.slow
def test_installed_console_script_runs(workspace, install_env, tmp_path):
    script = workspace / 'install' / PACKAGE / 'lib' / PACKAGE / 'lane-seg'
    result = subprocess.run(
        [str(script), '--help'], cwd=tmp_path, env=install_env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'usage' in result.stdout.lower(), result.stdout


@pytest.mark.slow
def test_every_module_and_data_file_is_installed(workspace, install_env):
    source = workspace / 'src' / PACKAGE  # the copy that was built
    site = Path(install_env['PYTHONPATH'].split(os.pathsep)[0])
    share = workspace / 'install' / PACKAGE / 'share' / PACKAGE

    def relative_files(root, pattern):
        return sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())

    # find_packages() drops a folder without __init__.py, and with it its modules.
    modules = relative_files(source, 'lane_seg/**/*.py')
    missing = [m for m in modules if not (site / m).is_file()]
    # setup.py installs launch/*.launch.py, config/* and models/* (no subfolders).
    data = [f for folder in ('launch', 'config', 'models')
            for f in relative_files(source, folder + '/**/*')]
    missing += ['share/%s/%s' % (PACKAGE, f) for f in data if not (share / f).is_file()]
    assert not missing, 'not installed by colcon build: %s' % missing


@pytest.mark.slow
def test_installed_metadata_matches_package_xml(workspace, install_env):
    manifest = parse_package(str(PACKAGE_ROOT), warnings=[])
    site = Path(install_env['PYTHONPATH'].split(os.pathsep)[0])
    metadata = sorted(site.glob('%s-*.egg-info/PKG-INFO' % PACKAGE)) + \
        sorted(site.glob('%s-*.dist-info/METADATA' % PACKAGE))
    assert len(metadata) == 1, 'expected one installed distribution in %s, found %s' % (
        site, metadata)
    fields = Parser().parsestr(metadata[0].read_text(), headersonly=True)
    assert fields['Name'] == manifest.name
    assert fields['Version'] == manifest.version, \
        'setup.py version %s != package.xml version %s' % (fields['Version'], manifest.version)
