"""bench/device.sh --dry: the prepared GPU measurement runs end to end on the CPU at toy sizes, so it cannot rot."""
import json, os, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_script_dry_runs_every_section(tmp_path):
    env = {**os.environ, 'OUT': str(tmp_path), 'PYTHON': sys.executable, 'PYTHONPATH': str(REPO)}
    r = subprocess.run(['bash', str(REPO / 'bench' / 'device.sh'), '--dry', '--budget', '300'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / 'device.jsonl').read_text().splitlines()]
    assert lines == [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]  # stdout and the file agree
    bad = [l for l in lines if l['name'] in ('error', 'skipped')]
    assert not bad, bad
    by = {}
    for l in lines:
        assert {'section', 'name', 't'} <= set(l)
        by.setdefault(l['section'], []).append(l)
    assert list(by) == ['start', 'parity', 'train', 'sample', 'fast-train', 'fast-sample', 'attention', 'folds', 'phantom', 'end']
    ens = {l['batched']: l for l in by['folds'] if l['name'] == 'ensemble'}
    assert set(ens) == {False, True} and by['folds'][-1]['max_restoration_diff'] < 1e-3
    assert all(l['ok'] for l in by['parity']) and {l['name'] for l in by['parity']} == {'unet-tiny', 'sampler-chain', 'ssim-maps', 'metrics'}
    tr = [l for l in by['train'] if l['name'] == 'train']
    assert {(l['stack'], l['compiled']) for l in tr} == {('condiff', False), ('official', False), ('condiff', True)}
    assert all(l['images_per_s'] > 0 for l in tr)
    sm = [l for l in by['sample'] if l['name'] == 'sample']
    assert {(l['stack'], l['cuda_graphs']) for l in sm} == {('condiff', False), ('condiff', True), ('official', False)}
    assert any('cuda_graphs=True needs a CUDA device' in w for l in sm for w in l['warnings'])  # the CPU fallback says so
    att = by['attention'][0]
    assert att['exp_per_image_forward'] > 0 and 0 < att['attention_share'] < 1
    ph = by['phantom'][0]
    assert ph['steps'] >= 1 and all((tmp_path / p).stat().st_size > 0 for p in ph['pngs'])
