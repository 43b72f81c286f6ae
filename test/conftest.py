"""
Fixtures shared by the test modules; plain helpers are in ``helpers.py``.

Nothing here is autouse: a module opts in, e.g. ``pytestmark = pytest.mark.usefixtures(
'one_thread')``, and a module-scoped fixture by naming ``one_thread_module``. torch is imported
only when such a fixture runs, so modules that do not use torch do not load it.
"""

import contextlib

import pytest


@contextlib.contextmanager
def _torch_threads(count):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (a busy 2-core host), then restore the count."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope='module')
def one_thread_module():
    """One torch thread from the module fixture that asks for it to the end of the module."""
    with _torch_threads(1):
        yield
