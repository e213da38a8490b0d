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


PRESET_COMMANDS = ('train', 'evaluate', 'ensemble', 'table1', 'figure3', 'reproduce')


def tiny_preset(argv):
    """The CLI's default preset is `cpu` (the CPU default: 64² data, fine-tuned from the shipped base model). The CLI
    tests exercise the command line itself on the small `tiny` preset, so they pass `--preset tiny` unless they name one."""
    argv = [str(a) for a in argv]
    if argv and argv[0] in PRESET_COMMANDS and '--preset' not in argv: argv = [argv[0], '--preset', 'tiny', *argv[1:]]
    return argv
