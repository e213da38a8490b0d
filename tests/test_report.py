"""Oracles for condiff.report: the quoted Table 1 against the paper's own text, the summaries against numpy /
statistics / scikit-learn, the written files against their parsers, Figure 3 helpers against brute force."""
import csv, re, statistics
from pathlib import Path
import numpy as np
import pytest
from condiff.experiment import TABLE1_COLUMNS, TESTSETS, PHANTOM_TESTSETS
from condiff.report import TABLE1_METRICS, OursResult, Figure3Panel, build_table1, closest_fold, format_value, intensity_control, lesion_ellipses, paper_table1, plot_figure3, random_metrics, read_table1_csv, save_figure3, select_examples, write_table1
from condiff.metrics import fold_summary

# Table 1 as it appears in the paper's text (../shared/paper/, lines 82-87, verbatim): one line per row group, the
# methods of a group in one field, then 16 fields (4 test sets x 4 metrics) each holding one number per method.
PAPER_LINES = [
    '\tRandom\t0.48\t0.50\t0.06\t0.11\t0.48\t0.50\t0.06\t0.11\t0.30\t0.50\t0.02\t0.03\t0.50\t0.50\t0.004\t0.01',
    'В\tVAE [17] r-VAE [8] f-AnoGAN [30] H-TAE-S [11]\t0.68 0.75 0.56 0.68\t$0.73 \\\\ 0.77 \\\\ 0.61 \\\\ 0.70$\t0.28 0.36 0.15 0.21\t$0.33 \\\\ 0.40 \\\\ 0.21 \\\\ 0.12$\t0.64 0.70 0.48 0.54\t$0.70 \\\\ 0.76 \\\\ 0.53 \\\\ 0.57$\t$\\begin{array}{c} 0.13 \\\\ 0.13 \\\\ 0.06 \\\\ 0.06 \\end{array}$\t0.19 0.19 0.12 0.12\t0.57 0.60 0.26 0.29\t0.76 0.78 0.46 0.49\t$\\begin{array}{c} \\underline{0.11} \\\\ 0.09 \\\\ 0.02 \\\\ 0.01 \\end{array}$\t$0.20 \\\\ 0.17 \\\\ 0.06 \\\\ 0.03$\t0.48 0.52 0.44 0.51\t$0.48 \\\\ 0.50 \\\\ 0.45 \\\\ 0.51$\t0.02 0.03 0.01 0.01\t$0.05 \\\\ 0.09 \\\\ 0.01 \\\\ 0.01$',
    '$\\mathbf{F}\\mathbf{M}$\tFAE [25] PaDiM [9] CFLOW-AD [13] RD [10]\t$\\begin{array}{r} \\underline{0.87} \\\\ 0.66 \\\\ 0.71 \\\\ 0.85 \\end{array}$\t$\\begin{array}{c} \\underline{0.87} \\\\ 0.68 \\\\ 0.72 \\\\ 0.85 \\end{array}$\t$\\begin{array}{c} \\underline{0.51} \\\\ 0.34 \\\\ 0.31 \\\\ 0.47 \\end{array}$\t$\\begin{array}{c} \\underline{0.52} \\\\ 0.38 \\\\ 0.35 \\\\ 0.50 \\end{array}$\t0.86 0.60 0.65 <u>0.81</u>\t0.85 0.65 0.69 <u>0.83</u>\t0.42 0.21 0.16 <u>0.36</u>\t0.45 0.28 0.24 <u>0.42</u>\t$0.50 \\\\ 0.34 \\\\ 0.40 \\\\ 0.55$\t$\\begin{array}{c} 0.73 \\\\ 0.56 \\\\ 0.62 \\\\ \\underline{0.77} \\end{array}$\t0.08 0.05 0.04 <u>0.11</u>\t0.18 0.13 0.10 <u>0.22</u>\t$\\begin{array}{r} 0.64 \\\\ 0.55 \\\\ 0.51 \\\\ \\underline{0.66} \\end{array}$\t$0.63 \\\\ 0.55 \\\\ 0.51 \\\\ 0.64$\t$\\begin{array}{c} 0.07 \\\\ 0.02 \\\\ 0.03 \\\\ \\underline{0.10} \\end{array}$\t$\\begin{array}{c} 0.15 \\\\ 0.07 \\\\ 0.08 \\\\ \\underline{0.19} \\end{array}$',
    'AB\tExpVAE [23] AMCons [31]\t0.63 0.78\t$\\begin{array}{c} 0.66\\\\ 0.78\\end{array}$\t$\\begin{array}{c} 0.12\\\\ 0.35\\end{array}$\t$\\begin{array}{c} 0.18\\\\ 0.40\\end{array}$\t$\\begin{array}{c} 0.56 \\\\ 0.61 \\end{array}$\t$\\begin{array}{c} 0.56 \\\\ 0.64 \\end{array}$\t$\\begin{array}{c} 0.07\\\\ 0.05 \\end{array}$\t$\\begin{array}{c} 0.13\\\\ 0.12\\end{array}$\t$0.37 \\\\ 0.32$\t$\\begin{array}{c} 0.57 \\\\ 0.53 \\end{array}$\t$\\begin{array}{c} 0.01 \\\\ 0.01 \\end{array}$\t$\\begin{array}{c} 0.03 \\\\ 0.03 \\end{array}$\t$0.53 \\\\ 0.49$\t$\\begin{array}{c} 0.54 \\\\ 0.49 \\end{array}$\t$\\begin{array}{c} 0.004 \\\\ 0.004 \\end{array}$\t0.01 0.01',
    's-s\tPII [32] DAE [16] CutPaste [19] Ours $_{ens.}$\t0.57 0.81 0.59 0.89\t0.62 0.80 0.63 0.88\t0.13 0.47 0.22 0.74\t0.22 0.49 0.26 0.69\t$0.54 \\\\ 0.70 \\\\ 0.61 \\\\ 0.75$\t$\\begin{array}{c} 0.64 \\\\ 0.74 \\\\ 0.65 \\\\ 0.77 \\end{array}$\t$\\begin{array}{c} 0.13 \\\\ 0.13 \\\\ 0.07 \\\\ 0.30 \\end{array}$\t0.22 0.20 0.13 0.36\t$\\begin{array}{c} 0.37 \\\\ 0.44 \\\\ 0.37 \\\\ 0.55 \\end{array}$\t$\\begin{array}{c} 0.60 \\\\ 0.65 \\\\ 0.58 \\\\ 0.75 \\end{array}$\t0.03 0.05 0.03 0.25\t0.07 0.13 0.06 0.34\t0.62 0.54 0.64 0.73\t0.63 0.55 0.60 0.73\t0.01 0.01 0.02 0.19\t0.01 0.03 0.06 0.27',
    '\t$Ours_{avg.}$ $Ours_{max.}$ $Ours_{std.}$\t$\\begin{array}{c} 0.88 \\\\ 0.89 \\\\ 0.01 \\end{array}$\t$\\begin{array}{c} 0.87 \\\\ 0.89 \\\\ 0.01 \\end{array}$\t$\\begin{array}{c} 0.69 \\\\ 0.77 \\\\ 0.05 \\end{array}$\t$\\begin{array}{c} 0.66 \\\\ 0.71 \\\\ 0.04 \\end{array}$\t$\\begin{array}{c} 0.72 \\\\ 0.75 \\\\ 0.03 \\end{array}$\t$\\begin{array}{c} 0.74 \\\\ 0.76 \\\\ 0.02 \\end{array}$\t$\\begin{array}{c} 0.26 \\\\ 0.34 \\\\ 0.05 \\end{array}$\t$\\begin{array}{c} 0.34 \\\\ 0.39 \\\\ 0.03 \\end{array}$\t$\\begin{array}{c} 0.54 \\\\ 0.60 \\\\ 0.04 \\end{array}$\t$\\begin{array}{c} 0.74 \\\\ 0.78 \\\\ 0.03 \\end{array}$\t$\\begin{array}{c} 0.18 \\\\ 0.31 \\\\ 0.06 \\end{array}$\t$\\begin{array}{c} 0.28 \\\\ 0.38 \\\\ 0.05 \\end{array}$\t$\\begin{array}{c} 0.71 \\\\ 0.74 \\\\ 0.01 \\end{array}$\t$\\begin{array}{c} 0.69 \\\\ 0.72 \\\\ 0.02 \\end{array}$\t$\\begin{array}{c} 0.14 \\\\ 0.17 \\\\ 0.02 \\end{array}$\t$\\begin{pmatrix} 0.24 \\\\ 0.27 \\\\ 0.02 \\end{pmatrix}$',
]
PAPER_TEXT = Path(__file__).resolve().parents[2] / 'shared' / 'paper' / '000_e358ff9c1174eedf.txt'
KEYS = [(c, m) for c in TABLE1_COLUMNS for m in TABLE1_METRICS]


def parse_paper_lines(lines):
    "{method: [16 printed strings]} from the paper's text lines (an oracle independent of the CSV transcription)."
    out = {}
    for line in lines:
        f = line.split('\t')
        names = re.sub(r'\s*\[\d+\]', '', f[1]).replace('$', '').replace('_{', '_').replace('.}', '').replace(' _', '_')
        names = names.split()
        cols = [re.findall(r'\d+\.\d+', x) for x in f[2:18]]
        assert len(cols) == 16 and all(len(c) == len(names) for c in cols), (names, cols)
        for i, n in enumerate(names): out[n] = [c[i] for c in cols]
    return out


def test_paper_lines_are_the_papers_text():
    if not PAPER_TEXT.is_file(): pytest.skip(f"{PAPER_TEXT} not available (the embedded copy is still checked below)")
    text = PAPER_TEXT.read_text().split('\n')
    for l in PAPER_LINES: assert l in text


def test_every_quoted_cell_matches_the_paper():
    paper = parse_paper_lines(PAPER_LINES)
    assert sorted(paper) == sorted(r.method for r in paper_table1())
    for r in paper_table1():
        assert [r.cell(c, m) for c, m in KEYS] == paper[r.method], r.method
        assert [r.values[k] for k in KEYS] == [float(x) for x in paper[r.method]]
        assert r.source == 'quoted'


def test_a_few_cells_by_hand():
    rows = {r.method: r for r in paper_table1()}
    assert rows['Ours_ens'].cell('BraTS-T2', 'AP_p') == '0.74'  # "+0.24 AP_p" sentence; method spec §8
    assert rows['Ours_ens'].cell('DDR', 'AP_p') == '0.19' and rows['DAE'].cell('DDR', 'AP_p') == '0.01'
    assert rows['Ours_ens'].cell('ATLAS', 'AP_p') == '0.25' and rows['DAE'].cell('ATLAS', 'AP_p') == '0.05'
    assert rows['Random'].cell('DDR', 'AP_p') == '0.004' and rows['Random'].cell('ATLAS', 'AP_p') == '0.02'
    assert rows['DAE'].cell('BraTS-T1', 'AP_p') == '0.13' and rows['Ours_ens'].cell('BraTS-T1', 'AP_p') == '0.30'


def test_format_value():
    assert [format_value(v) for v in (0.004, 0.0, 0.745, 0.7449, 1.0, None, float('nan'))] == \
           ['0.004', '0.00', '0.74', '0.74', '1.00', '–', '–']


def test_fold_summary_against_statistics():
    rng = np.random.default_rng(0)
    folds = {f: {m: float(rng.random()) for m in TABLE1_METRICS} for f in range(10)}
    s, s1 = fold_summary(folds), fold_summary(folds, ddof=1)
    for m in TABLE1_METRICS:
        v = [folds[f][m] for f in range(10)]
        assert s['avg'][m] == pytest.approx(statistics.fmean(v))
        assert s['max'][m] == max(v)
        assert s['std'][m] == pytest.approx(statistics.pstdev(v))
        assert s1['std'][m] == pytest.approx(statistics.stdev(v))
    with pytest.raises(ValueError, match='not finite'): fold_summary([{m: float('nan') for m in TABLE1_METRICS}])
    with pytest.raises(ValueError, match='ddof'): fold_summary(folds, ddof=2)


def test_random_metrics_is_what_a_constant_score_gets():
    "sklearn oracle: a constant score (a classifier that knows nothing) has AP = the positive rate, Dice = 2p/(1+p)."
    from sklearn.metrics import average_precision_score, precision_recall_curve
    rng = np.random.default_rng(1)
    masks = rng.random((12, 1, 16, 16)) < 0.07
    masks[3] = False
    labels = masks.reshape(12, -1).any(1).astype(int)
    r = random_metrics(labels, masks)
    assert r['AP_i'] == pytest.approx(average_precision_score(labels, np.zeros(12)))
    assert r['AP_p'] == pytest.approx(average_precision_score(masks.ravel(), np.zeros(masks.size)))
    p, rc, _ = precision_recall_curve(masks.ravel(), np.zeros(masks.size))
    assert r['max_Dice'] == pytest.approx(np.nanmax(2 * p * rc / (p + rc)))
    assert r['AUROC'] == 0.5


def test_intensity_control_against_sklearn():
    "The Intensity control scores the image itself: sklearn on the raw pixels and on the per-image means."
    from sklearn.metrics import average_precision_score, roc_auc_score, precision_recall_curve
    rng = np.random.default_rng(6)
    imgs = rng.random((10, 3, 12, 12)).astype(np.float32)
    masks = rng.random((10, 1, 12, 12)) < 0.1
    masks[:3] = False
    imgs[:, :, 4:6, 4:6] += masks[:, :, 4:6, 4:6] * 0.5  # lesions a little brighter where they overlap
    imgs = np.clip(imgs, 0, 1)
    c = intensity_control(imgs, masks)
    x = imgs.mean(1, keepdims=True)
    labels = masks.reshape(10, -1).any(1)
    assert c['AP_p'] == pytest.approx(average_precision_score(masks.ravel(), x.ravel()))
    p, r, _ = precision_recall_curve(masks.ravel(), x.ravel())
    with np.errstate(invalid="ignore"): assert c["max_Dice"] == pytest.approx(np.nanmax(2 * p * r / (p + r)))
    assert c['AUROC'] == pytest.approx(roc_auc_score(labels, x.reshape(10, -1).mean(1)))
    assert c['AP_i'] == pytest.approx(average_precision_score(labels, x.reshape(10, -1).mean(1)))
    ens = dict(AP_i=.9, AUROC=.8, AP_p=.7, max_Dice=.6)
    t = build_table1([OursResult('phantom-atlas', ens, {0: ens}, control=c)])
    assert [r.method for r in t.ours] == ['Intensity', 'Ours_ens', 'Ours_avg', 'Ours_max', 'Ours_std']
    assert t.row('Intensity').values[('ATLAS', 'AP_p')] == c['AP_p'] and any('Intensity = the test image' in n for n in t.notes)


def _res(name, ens, folds=10, preset='tiny'):
    fm = {f: {m: ens[m] - 0.01 * (f + 1) for m in TABLE1_METRICS} for f in range(folds)}
    return OursResult(name, dict(ens), fm, preset, dict(AP_i=.3, AUROC=.5, AP_p=.004, max_Dice=.008), n_images=40)


def test_build_table1_rows_and_marking():
    ens = dict(AP_i=.9, AUROC=.8, AP_p=.7, max_Dice=.6)
    t = build_table1([_res('phantom-ddr', ens), _res('phantom-brats-t2', ens)], commit='f' * 40)
    assert [r.method for r in t.quoted] == [r.method for r in paper_table1()]
    assert [r.method for r in t.ours] == ['Random', 'Ours_ens', 'Ours_avg', 'Ours_max', 'Ours_std']
    assert all('phantom data' in r.data and 'commit ffffffffff' in r.data and 'folds 0–9' in r.data for r in t.ours)
    e, avg, mx, sd = (t.row(m) for m in ('Ours_ens', 'Ours_avg', 'Ours_max', 'Ours_std'))
    for c in ('BraTS-T2', 'DDR'):
        for m in TABLE1_METRICS:
            v = [ens[m] - 0.01 * (f + 1) for f in range(10)]
            assert e.values[(c, m)] == ens[m] and mx.values[(c, m)] == pytest.approx(max(v))
            assert avg.values[(c, m)] == pytest.approx(np.mean(v)) and sd.values[(c, m)] == pytest.approx(np.std(v))
    assert e.cell('BraTS-T1', 'AP_i') == '–' and e.cell('ATLAS', 'AP_p') == '–'
    assert any('BraTS-T2 = phantom-brats-t2 (40 images)' in n for n in t.notes)
    assert any(n.startswith('quoted: Baugh et al. 2024') for n in t.notes)


def test_build_table1_errors():
    ens = dict(AP_i=.9, AUROC=.8, AP_p=.7, max_Dice=.6)
    with pytest.raises(ValueError, match='unknown test set'): OursResult('brats', ens, {})
    with pytest.raises(ValueError, match="lack 'AP_p'"): OursResult('ddr', dict(AP_i=1, AUROC=1, max_Dice=1), {})
    with pytest.raises(ValueError, match='two results'): build_table1([_res('ddr', ens), _res('ddr', ens)])


def test_written_files_agree(tmp_path):
    ens = dict(AP_i=.9, AUROC=.8, AP_p=.0712, max_Dice=.005)
    t = build_table1([_res(n, ens) for n in PHANTOM_TESTSETS], commit='abc1234')
    p = write_table1(t, tmp_path / 'pf')
    assert sorted(x.name for x in (tmp_path / 'pf').iterdir()) == ['table1.csv', 'table1.md', 'table1.tex']
    rows = list(csv.DictReader(open(p['csv'], newline='', encoding='utf-8')))
    assert len(rows) == 18 + 5
    assert {r['source'] for r in rows[:18]} == {'quoted'} and {r['source'] for r in rows[18:]} == {'ours'}
    paper = parse_paper_lines(PAPER_LINES)
    for r in rows[:18]: assert [r[f"{c}/{m}"] for c, m in KEYS] == paper[r['method']]
    ours = {r['method']: r for r in rows[18:]}
    assert ours['Ours_ens']['DDR/AP_p'] == '0.07' and ours['Ours_ens']['DDR/max_Dice'] == '0.005'
    assert read_table1_csv(p['csv']).row('Ours_ens').values[('ATLAS', 'AP_i')] == 0.9
    md = p['md'].read_text(encoding='utf-8')
    table = [l for l in md.splitlines() if l.startswith('|')]
    assert len({l.count('|') for l in table}) == 1  # every markdown row has the same number of cells
    assert sum('| **ours** |' in l for l in table) == 5 and sum('| quoted |' in l for l in table) == 18
    assert 'phantom data, preset tiny, folds 0–9, commit abc1234' in md
    tex = p['tex'].read_text(encoding='utf-8')
    body = [l for l in tex.splitlines() if l.endswith(r'\\') and not l.startswith(r'\multicolumn')]
    assert all(l.count('&') == 17 for l in body[1:]), [l for l in body[1:] if l.count('&') != 17][:1]
    assert tex.count('{') == tex.count('}') and r'\begin{tabular}' in tex and r'\end{tabular}' in tex
    assert tex.count('(ours)') == 5


def test_read_table1_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='table1.csv'): read_table1_csv(tmp_path / 'table1.csv')
    (tmp_path / 'x.csv').write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match='not a condiff table1.csv'): read_table1_csv(tmp_path / 'x.csv')


def test_closest_fold_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(5):
        fm = rng.random((10, 3, 1, 8, 8)) ** rng.integers(1, 4, (10, 1, 1, 1, 1))
        mean = fm.mean(0)
        want = min(range(10), key=lambda f: float(np.mean([abs(a - b) for a, b in zip(fm[f].ravel(), mean.ravel())])))
        assert closest_fold(fm) == want
    with pytest.raises(ValueError, match='NaN'): closest_fold(np.full((2, 1, 2, 2), np.nan))


def test_select_examples_one_per_volume_largest_first():
    rng = np.random.default_rng(3)
    masks = rng.random((30, 1, 8, 8)) < rng.random((30, 1, 1, 1)) * 0.5
    ids = [f"v{i // 5}/z{i % 5:03d}" for i in range(30)]
    got = select_examples(masks, ids, k=4)
    area = masks.reshape(30, -1).sum(1)
    best = {}
    for i in range(30):
        v = ids[i].split('/')[0]
        if area[i] > 0 and (v not in best or area[i] > area[best[v]]): best[v] = i
    want = sorted(best.values(), key=lambda i: (-area[i], i))[:4]
    assert [area[i] for i in got] == [area[i] for i in want] and len({ids[i].split('/')[0] for i in got}) == 4
    # fundus ids ('unhealthy/<name>') are single images: several may come from the 'unhealthy' group
    assert len(select_examples(masks, [f"unhealthy/im{i}" for i in range(30)], k=3)) == 3


def test_lesion_ellipses_enclose_every_lesion_pixel():
    rng = np.random.default_rng(4)
    for _ in range(20):
        m = rng.random((64, 64)) < 0.002
        m[rng.integers(0, 60), rng.integers(0, 60)] = True
        el = lesion_ellipses(m, pad=2, merge=3)
        yy, xx = np.nonzero(m)
        inside = np.zeros(len(yy), bool)
        for cy, cx, h, w in el:
            inside |= ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        assert inside.all() and len(el) <= int(m.sum())
    with pytest.raises(ValueError, match='H×W'): lesion_ellipses(np.zeros((2, 2, 2, 2), bool))


def test_figure3_files(tmp_path):
    rng = np.random.default_rng(5)
    img = rng.random((2, 1, 32, 32)).astype(np.float32)
    m = np.zeros((2, 1, 32, 32), bool); m[:, :, 10:15, 10:15] = True
    rgb = rng.random((1, 3, 32, 32)).astype(np.float32)
    mm = np.zeros((1, 1, 32, 32), bool); mm[0, 0, 5, 5] = True
    fig = plot_figure3([Figure3Panel('a', img, m, img, rng.random((2, 1, 32, 32)), fold=2),
                        Figure3Panel('b', rgb, mm, rgb, rng.random((1, 1, 32, 32)), ellipses=True)])
    axes = fig.get_axes()
    assert len(axes) == 2 * 6
    assert len(axes[6].patches) == 1 and len(axes[0].collections) >= 1  # an ellipse for DDR, a contour for MRI
    assert not axes[9].axison  # the missing second example of row b is left blank
    p = save_figure3(fig, tmp_path)
    from PIL import Image
    assert Image.open(p['png']).size[0] > 500 and p['pdf'].read_bytes()[:5] == b'%PDF-'
    with pytest.raises(ValueError, match='maps must have shape'): Figure3Panel('c', img, m, img, img[:1])
    with pytest.raises(ValueError, match='at least one panel'): plot_figure3([])


def test_testsets_cover_the_table():
    for kind in ('phantom', 'real'):
        assert sorted(t.column for t in TESTSETS.values() if t.data == kind) == sorted(TABLE1_COLUMNS)
    # T1 models serve BraTS-T1 and ATLAS (method spec §4)
    assert TESTSETS['brats-t1'].family == TESTSETS['atlas'].family == 'camcan-t1'
