"Shared pytest fixtures."
import pytest


@pytest.fixture(scope='module')
def one_thread():
    """Run a module's tiny CPU workloads with one torch intra-op thread, restored afterwards.
    On a shared 2-core machine, OpenMP threads spinning against other jobs make small models several times slower;
    the thread count changes no result the tests check. Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
