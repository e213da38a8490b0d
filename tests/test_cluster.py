"""condiff.cluster: `reproduce` on a Dask LocalCluster of 2 worker processes gives the local path's results (metrics and
weights, bit for bit); a worker killed mid-training has its step rescheduled, the fold resumes from its checkpoint and
the result is still identical; the generated SLURM submission script asks for what the docs say."""
import os, signal, subprocess, threading, time
from pathlib import Path
import pytest
from condiff import experiment
from condiff.pipeline import ReproduceConfig, reproduce
from condiff.detect import volume_to_slices
from condiff.cluster import cluster_client, jobqueue_cluster, reproduce_on_cluster
from condiff.data import SliceSet, save_sliceset
from condiff.train import load_model, weights_digest
from conftest import ellipsoid

pytestmark = pytest.mark.usefixtures('one_thread')

FAMILY = 'phantom-brats-t1'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('cluster')
    sl, _ = volume_to_slices(ellipsoid())
    keep = sl.reshape(len(sl), -1).max(1) > 0
    save_sliceset(SliceSet(sl[keep], [f"s/z{i}" for i in range(int(keep.sum()))], 'MRI'), root / 'mri.npz')
    return root / 'mri.npz'


def config(tmp: Path, data: Path) -> ReproduceConfig:
    "Two tiny folds, 16 steps each with a checkpoint every 4, evaluated on 6 phantom test images with 2 sampling steps."
    return ReproduceConfig(testsets=(FAMILY,), folds=(0, 1), max_steps=16, num_steps=2, test_images=6, preset='tiny',
                           runs=str(tmp / 'runs'), out=str(tmp / 'pf'), jobs=1, threads=1,
                           train_overrides=dict(train_data=str(data), val_data=str(data), batch_size=2, val_batch_size=2,
                                                val_start=8, val_every=8, checkpoint_every=4))


def digests(cfg):
    return [weights_digest(load_model(experiment.fold_dir(cfg.runs, FAMILY, 'tiny', f), 'latest')[0].state_dict()) for f in cfg.folds]


@pytest.fixture(scope='module')
def local(tmp_path_factory, data):
    cfg = config(tmp_path_factory.mktemp('local'), data)
    return reproduce(cfg, progress=False, log=None), digests(cfg)


@pytest.fixture(scope='module')
def client():
    c, cl = cluster_client('local:2')
    yield c
    c.close(); cl.close()


def test_local_cluster_gives_the_local_results(local, client, data, tmp_path):
    cfg = config(tmp_path, data)
    man = reproduce_on_cluster(cfg, client=client, progress=False, log=None)
    assert man['engine']['name'] == 'dask' and man['engine']['workers'] == 2
    assert man['results'] == local[0]['results']
    assert digests(cfg) == local[1]
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == sorted(p.name for p in Path(local[0]['config']['out']).iterdir())


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(local, client, data, tmp_path):
    cfg = config(tmp_path, data)
    fold0 = experiment.fold_dir(cfg.runs, FAMILY, 'tiny', 0)
    ck = fold0 / 'checkpoints'
    killed, created, stop = {}, set(), threading.Event()

    def killer():  # once fold 0 has a checkpoint: SIGKILL the worker process training it, then watch what it saves next
        while not stop.is_set():
            if not killed and (ck / 'latest').is_symlink():
                proc = client.processing()
                addr = next((a for a, ks in proc.items() if any('train-phantom-brain-t1-fold0' in str(k) for k in ks)), None)
                if addr is not None:
                    pid = client.run(os.getpid, workers=[addr])[addr]
                    latest, before = os.readlink(ck / 'latest'), {p.name for p in ck.glob('step-*')}
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, latest=latest, before=before, status=(fold0 / 'run.json').read_text())
            elif killed: created.update(p.name for p in ck.glob('step-*') if p.name not in killed['before'])
            time.sleep(0.005)

    th = threading.Thread(target=killer, daemon=True); th.start()
    try: man = reproduce_on_cluster(cfg, client=client, progress=False, log=None)
    finally: stop.set(); th.join()
    assert killed, "the training worker was not killed"
    step = lambda name: int(name.split('-')[1])
    assert '"finished"' not in killed['status'] and step(killed['latest']) < 16  # killed mid-training
    # the rescheduled step resumed from the checkpoint it found: every checkpoint saved after the kill is a later step
    assert created and all(step(n) > step(killed['latest']) for n in created), (killed['latest'], created)
    assert man['results'] == local[0]['results'] and digests(cfg) == local[1]  # and the result is the same
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def test_slurm_submission_script():
    c = jobqueue_cluster('slurm', gpus=1, folds_per_gpu=2, cores=8, memory='32GB', walltime='24:00:00', queue='gpu',
                         scheduler_options={'dashboard_address': ':0'},
                         account='mylab', job_script_prologue=['module load cuda/12.4', 'source ~/venvs/condiff/bin/activate'])
    try: s = c.job_script()
    finally: c.close()
    lines = s.splitlines()
    assert lines[0].startswith('#!') and 'bash' in lines[0]
    for d in ('#SBATCH -p gpu', '#SBATCH -A mylab', '#SBATCH -t 24:00:00', '#SBATCH --gres=gpu:1', '#SBATCH --cpus-per-task=8',
              '#SBATCH --mem=30G'):
        assert d in lines, (d, s)
    assert '#SBATCH -J condiff' in lines
    assert lines.index('export DASK_DISTRIBUTED__WORKER__DAEMON=False') < lines.index('module load cuda/12.4') < len(lines) - 1
    worker = lines[-1]  # one worker per job, 8 threads, declaring the GPU that steps share (2 at a time: each asks GPU=0.5)
    assert 'distributed.cli.dask_worker' in worker and '--nthreads 8' in worker and '--resources GPU=1' in worker
    assert '--nworkers' not in worker and '--nanny' in worker
    assert subprocess.run(['bash', '-n'], input=s, text=True).returncode == 0  # valid shell


def test_cluster_spec_errors():
    from condiff.checks import BadInput
    for bad in ('local:0', 'slurm:x', 'kubernetes'):
        with pytest.raises(BadInput): reproduce_on_cluster(None, bad)
    with pytest.raises(BadInput, match='one GPU per job'): jobqueue_cluster('slurm', gpus=2)
