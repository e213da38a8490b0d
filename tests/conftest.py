"Shared pytest fixtures."
import numpy as np
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


def ellipsoid(shape=(40, 36, 6), value=300.0, seed=0):
    "A noisy ellipsoid volume (a skull-stripped 'scan') for the detect tests."
    g = np.mgrid[tuple(slice(0, s) for s in shape)].astype(np.float32)
    c = [(s - 1) / 2 for s in shape]
    inside = ((g[0] - c[0]) / (shape[0] * .35)) ** 2 + ((g[1] - c[1]) / (shape[1] * .33)) ** 2 + ((g[2] - c[2]) / (shape[2] * .6)) ** 2 < 1
    rng = np.random.default_rng(seed)
    return (inside * (value + 20 * rng.standard_normal(shape))).clip(0).astype(np.float32)


def tiny_mri_folds(root, folds):
    "Tiny MRI folds (two steps each) trained at 32² on slices of `ellipsoid()`; returns their family folder."
    from condiff.data import SliceSet, save_sliceset
    from condiff.detect import volume_to_slices
    from condiff.pipeline import fold_config, train_fold
    sl, _ = volume_to_slices(ellipsoid(), 32)
    keep = sl.reshape(len(sl), -1).max(1) > 0
    save_sliceset(SliceSet(sl[keep], [f"s/z{i}" for i in range(int(keep.sum()))], 'MRI'), root / 'mri.npz')
    for f in folds:
        train_fold(fold_config('phantom-brain', 't1', f, preset='tiny', train_data=str(root / 'mri.npz'), val_data=str(root / 'mri.npz'),
                               max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1),
                   root / 'runs', progress=False)
    return root / 'runs' / 'phantom-brain-t1' / 'tiny'
