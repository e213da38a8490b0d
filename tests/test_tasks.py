"Oracle and property tests for condiff.tasks (the synthetic anomaly tasks, Poisson blending, folds, seeding)."
import itertools, math, time
import numpy as np
import pytest
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats
from condiff.tasks import (FOLDS, fold_tasks, sample_rng, check_image, foreground_mask, sample_shape, foreground_regions,
                           size_bounds, find_location, dst1, idst1, poisson_blend, guidance_divergence, source_patch,
                           MultiSource, texture_source, sample_push, push_exponent, radial_map, deform_patch,
                           perlin_fractal, intensity_patch, apply_task, RestorationTask, TEXTURES, original_bounds)


def brain_like(size=128, seed=0, radii=(0.38, 0.3)):
    "A skull-stripped-MRI-like slice: a textured ellipse in [0, 1] on a background of exactly 0."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    inside = ((yy - 0.5) / radii[0]) ** 2 + ((xx - 0.5) / radii[1]) ** 2 < 1
    tex = 0.55 + 0.25 * np.sin(17 * xx + 3 * yy) * np.cos(11 * yy) + 0.05 * rng.standard_normal((size, size))
    return (inside * np.clip(tex, 0.05, 0.95))[None].astype(np.float32)


def fundus_like(size=96, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.random((3, size, size)) * 0.3 + np.linspace(0.2, 0.7, 3)[:, None, None], 0, 1).astype(np.float32)


BRAIN = brain_like()
SAME = np.stack([brain_like(seed=s) for s in range(4)])


# ---------------------------------------------------------------- folds and seeding
def test_fold_table_equals_spec():
    spec = """0 | 0,1,2 | 3,4
1 | 0,1,3 | 2,4
2 | 0,1,4 | 2,3
3 | 0,2,3 | 1,4
4 | 0,2,4 | 1,3
5 | 0,3,4 | 1,2
6 | 1,2,3 | 0,4
7 | 1,2,4 | 0,3
8 | 1,3,4 | 0,2
9 | 2,3,4 | 0,1"""
    for line in spec.splitlines():
        f, tr, va = (c.strip() for c in line.split('|'))
        assert fold_tasks(int(f)) == (tuple(map(int, tr.split(','))), tuple(map(int, va.split(','))))
    assert FOLDS == list(itertools.combinations(range(5), 3)) and len(FOLDS) == 10


@pytest.mark.parametrize('bad', [-1, 10, 1.0, True, '0', None])
def test_bad_fold(bad):
    with pytest.raises(ValueError, match='fold'): fold_tasks(bad)


# ---------------------------------------------------------------- DST-I and the Poisson solver
@pytest.mark.parametrize('n', [1, 2, 5, 16, 33])
def test_dst1_matches_scipy(n):
    x = np.random.default_rng(n).standard_normal((4, n, 3))
    np.testing.assert_allclose(dst1(x, axis=1), scipy.fft.dst(x, type=1, axis=1), atol=1e-10)
    np.testing.assert_allclose(idst1(x, axis=1), scipy.fft.idst(x, type=1, axis=1), atol=1e-10)


def _mixed_divergence_loops(t, s, mask):
    "Independent, loop-based divergence of the mixed guidance field (forward gradients, backward divergence)."
    C, h, w = t.shape
    m = mask.copy(); m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = False
    def grads(x, c):
        gy = np.zeros((h, w)); gx = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                gy[i, j] = (x[c, i + 1, j] if i + 1 < h else x[c, h - 2, j]) - x[c, i, j]
                gx[i, j] = (x[c, i, j + 1] if j + 1 < w else x[c, i, w - 2]) - x[c, i, j]
        return gy, gx
    div = np.zeros((C, h - 2, w - 2))
    for c in range(C):
        (ty, tx), (sy, sx) = grads(t, c), grads(s, c)
        vy = np.where(m & (np.abs(sy) > np.abs(ty)), sy, ty)
        vx = np.where(m & (np.abs(sx) > np.abs(tx)), sx, tx)
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                div[c, i - 1, j - 1] = vy[i, j] - vy[i - 1, j] + vx[i, j] - vx[i, j - 1]
    return div


def _laplacian_loops(f):
    C, h, w = f.shape
    out = np.zeros((C, h - 2, w - 2))
    for c in range(C):
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                out[c, i - 1, j - 1] = f[c, i + 1, j] + f[c, i - 1, j] + f[c, i, j + 1] + f[c, i, j - 1] - 4 * f[c, i, j]
    return out


@pytest.mark.parametrize('seed', [0, 1])
def test_poisson_satisfies_its_equation(seed):
    rng = np.random.default_rng(seed)
    h, w = 17, 23
    t, s = rng.random((2, h, w)), rng.random((2, h, w)) * 2
    shape = sample_shape(rng, (64, 64), (10, 14), (h - 2, w - 2))
    mask = np.zeros((h, w), bool)
    mh, mw = shape.mask.shape
    mask[:min(mh, h), :min(mw, w)] = shape.mask[:h, :w]
    f = poisson_blend(t, s, mask)
    div = _mixed_divergence_loops(t, s, mask)
    lap = _laplacian_loops(f)
    np.testing.assert_allclose(lap, div, atol=1e-9)                               # everywhere on the interior,
    assert np.abs(lap - div)[:, mask[1:-1, 1:-1]].max() < 1e-9                     # so in particular inside the mask
    np.testing.assert_array_equal(f[:, [0, -1], :], t[:, [0, -1], :])              # border unchanged
    np.testing.assert_array_equal(f[:, :, [0, -1]], t[:, :, [0, -1]])
    np.testing.assert_allclose(guidance_divergence(t, s, mask), div, atol=1e-12)


def test_poisson_matches_sparse_solver():
    "The DST solution equals a direct sparse solve of the same Dirichlet problem."
    rng = np.random.default_rng(3)
    h, w = 12, 15
    t, s = rng.random((1, h, w)), rng.random((1, h, w))
    mask = np.zeros((h, w), bool); mask[2:10, 3:13] = True
    n, m = h - 2, w - 2
    L = (scipy.sparse.kron(scipy.sparse.eye(n), scipy.sparse.diags([1., -2., 1.], [-1, 0, 1], (m, m)))
         + scipy.sparse.kron(scipy.sparse.diags([1., -2., 1.], [-1, 0, 1], (n, n)), scipy.sparse.eye(m))).tocsc()
    bnd = t[0].copy(); bnd[1:-1, 1:-1] = 0
    rhs = _mixed_divergence_loops(t, s, mask)[0] - _laplacian_loops(bnd[None])[0]
    u = scipy.sparse.linalg.spsolve(L, rhs.ravel()).reshape(n, m)
    np.testing.assert_allclose(poisson_blend(t, s, mask)[0, 1:-1, 1:-1], u, atol=1e-10)


def test_poisson_known_solutions():
    yy, xx = np.mgrid[:20, :24].astype(float)
    # 1. target flat (0), source a bump vanishing on the two outer rings: mixed gradients take the source's, so f = bump
    bump = np.zeros((20, 24)); bump[2:-2, 2:-2] = np.sin(np.pi * (yy[2:-2, 2:-2] - 1) / 17) ** 2 * np.sin(np.pi * (xx[2:-2, 2:-2] - 1) / 21)
    f = poisson_blend(np.zeros((1, 20, 24)), bump[None], np.ones((20, 24), bool))
    np.testing.assert_allclose(f[0], bump, atol=1e-10)
    # 2. plain cloning: target = g + noise blob, source = g, mask around the blob -> f = g
    g = 0.3 + 0.01 * yy + 0.02 * np.cos(xx / 3)
    t = g.copy(); t[6:13, 7:16] += np.random.default_rng(0).random((7, 9))
    mask = np.zeros((20, 24), bool); mask[5:14, 6:17] = True
    np.testing.assert_allclose(poisson_blend(t[None], g[None], mask, mix_gradients=False)[0], g, atol=1e-10)
    # 3. a source equal to the target plus a constant changes nothing
    np.testing.assert_allclose(poisson_blend(t[None], t[None] + 0.5, mask)[0], t, atol=1e-10)


# ---------------------------------------------------------------- shapes
def test_side_law_matches_gamma_cdf():
    "Unclipped sides are floor((0.03 + Gamma(2, 0.1))·N): compare the empirical CDF with scipy's gamma."
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(4000):
        sh = sample_shape(rng, (128, 128), (1, 1), (10_000, 10_000))
        sides += list(sh.sides)
    sides = np.array(sides)
    ks = np.arange(5, 90)
    emp = np.array([(sides <= k).mean() for k in ks])
    ref = scipy.stats.gamma(2, scale=0.1).cdf((ks + 1) / 128 - 0.03)
    assert np.abs(emp - ref).max() < 0.02


def test_shapes_grid_bound_and_ray_to_edge():
    rng = np.random.default_rng(1)
    lb, ub = np.array([5, 5]), np.array([20, 30])
    for _ in range(300):
        sh = sample_shape(rng, (128, 128), lb, ub)
        h, w = sh.mask.shape
        assert h % 2 == 1 and w % 2 == 1 and sh.mask[h // 2, w // 2]
        assert h <= ub[0] + 2 and w <= ub[1] + 2                                   # the official rounding: ub + 2 at most
        assert min(sh.sides) >= 1 and max(sh.sides) >= 2
        ys, xs = np.nonzero(sh.mask); i = rng.integers(len(ys)); o = np.array([ys[i], xs[i]], float)
        a = rng.uniform(0, 2 * np.pi, 4); dirs = np.stack([np.sin(a), np.cos(a)], 1)
        D = sh.ray_to_edge(o, dirs)
        assert sh.inside(o + (D[:, None] - 1e-6) * dirs).all() and not sh.inside(o + (D[:, None] + 1e-6) * dirs).any()


def test_orientation_is_uniform():
    "θ ~ U(-π/2, π/2): the principal axis of elongated shapes (measured from the mask's moments) is uniform mod π."
    rng = np.random.default_rng(3)
    angles = []
    for _ in range(400):
        sh = sample_shape(rng, (128, 32), (60, 1), (61, 120))            # ~60×6: elongated, grid unconstrained
        ys, xs = np.nonzero(sh.mask)
        cov = np.cov(np.stack([ys, xs]).astype(float))
        w, v = np.linalg.eigh(cov)
        angles.append(math.atan2(v[1, -1], v[0, -1]) % math.pi)
    assert scipy.stats.kstest(angles, scipy.stats.uniform(0, math.pi).cdf).pvalue > 1e-3


def test_rect_and_ellipse_areas():
    rng = np.random.default_rng(2)
    for kind, factor in (('rect', 1.0), ('ellipse', math.pi / 4)):
        ratios = []
        for _ in range(200):
            sh = sample_shape(rng, (128, 128), (20, 20), (60, 60), kind=kind)
            det = abs(np.linalg.det(sh.M))
            ratios.append(sh.mask.sum() / (factor * sh.sides[0] * sh.sides[1] * det))
        assert abs(np.mean(ratios) - 1) < 0.03


# ---------------------------------------------------------------- placement
def test_every_anomaly_overlaps_foreground_and_counts():
    small = brain_like(radii=(0.2, 0.14))                                        # room around it for low overlaps
    mask = foreground_mask(small)
    counts, ovs = np.zeros(5), []
    for i in range(600):
        out, info = apply_task(4, small, sample_rng(0, 0, i), mask, return_info=True)
        counts[len(info['anomalies'])] += 1
        for a in info['anomalies']:
            (y, x), m = a['corner'], a['shape'].mask
            ov = (mask[y:y + m.shape[0], x:x + m.shape[1]] & m).sum() / m.sum()
            assert ov >= 0.25 and abs(ov - a['overlap']) < 1e-12
            ovs.append(ov)
    assert np.mean(np.array(ovs) < 0.3) > 0.02                                   # the threshold binds
    p = counts[1:] / counts.sum()
    expected = np.array([.5, .25, .125, .125])
    assert scipy.stats.chisquare(counts[1:], expected * counts.sum()).pvalue > 1e-3, p


def test_anomalies_reach_into_background():
    "fg_only is off: a sizeable part of the shapes lies outside the brain, and that part is changed by task 4."
    mask = foreground_mask(BRAIN)
    out_frac = []
    for i in range(200):
        _, info = apply_task(4, BRAIN, sample_rng(1, 0, i), mask, return_info=True)
        for a in info['anomalies']:
            (y, x), m = a['corner'], a['shape'].mask
            out_frac.append((~mask[y:y + m.shape[0], x:x + m.shape[1]] & m).sum() / m.sum())
    assert 0.05 < np.mean(out_frac) < 0.5


def test_size_bounds_follow_largest_region():
    m = np.zeros((128, 128), bool); m[10:60, 20:50] = True; m[100:104, 100:127] = True
    fg = foreground_regions(m)
    assert fg.size == (50, 30)
    lb, ub = size_bounds(fg.size)
    assert lb.tolist() == [3, 2] and ub.tolist() == [40, 24]
    np.testing.assert_allclose(np.diff(np.r_[0, fg.cum]), np.array([50 * 30, 4 * 27]) / (50 * 30 + 4 * 27))


# ---------------------------------------------------------------- the tasks
@pytest.mark.parametrize('task', [2, 3])
def test_deformations_leave_outside_unchanged(task):
    mask = foreground_mask(BRAIN)
    changed_any = False
    for i in range(40):
        out, info = apply_task(task, BRAIN, sample_rng(2, task, i), mask, return_info=True)
        inside = np.zeros(BRAIN.shape[1:], bool)
        for a in info['anomalies']:
            (y, x), m = a['corner'], a['shape'].mask
            inner = m.copy(); inner[[0, -1], :] = False; inner[:, [0, -1]] = False     # the patch border never moves
            inside[y:y + m.shape[0], x:x + m.shape[1]] |= inner
        np.testing.assert_array_equal(out[:, ~inside], BRAIN[:, ~inside])
        changed_any |= bool((out != BRAIN).any())
    assert changed_any


def test_intensity_change_stays_in_shapes():
    mask = foreground_mask(BRAIN)
    for i in range(40):
        out, info = apply_task(4, BRAIN, sample_rng(3, 0, i), mask, return_info=True)
        inside = np.zeros(BRAIN.shape[1:], bool)
        for a in info['anomalies']:
            (y, x), m = a['corner'], a['shape'].mask
            inside[y:y + m.shape[0], x:x + m.shape[1]] |= m
        np.testing.assert_array_equal(out[:, ~inside], BRAIN[:, ~inside])


@pytest.mark.parametrize('task', range(5))
@pytest.mark.parametrize('kind', ['mri', 'rgb'])
def test_values_stay_in_original_range(task, kind):
    img = BRAIN if kind == 'mri' else fundus_like()
    mask = foreground_mask(img) if kind == 'mri' else None
    same = SAME if kind == 'mri' else np.stack([fundus_like(seed=s) for s in range(3)])
    lo, hi = img.min((1, 2)), img.max((1, 2))
    before = img.copy()
    for i in range(15):
        out = apply_task(task, img, sample_rng(4, task, i), mask, same_source=same)
        assert out.dtype == np.float32 and out.shape == img.shape and np.isfinite(out).all()
        assert (out.min((1, 2)) >= lo).all() and (out.max((1, 2)) <= hi).all()
    np.testing.assert_array_equal(img, before)                                     # the input is never modified


def half_brain(size=64):
    "A brain-like slice whose right 40% of columns hold no foreground at all (all zero)."
    img = brain_like(size, radii=(0.4, 0.45))
    img[:, :, int(0.6 * size):] = 0
    return img


def test_original_bounds():
    img = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    lo, hi = original_bounds(img, 'column')
    assert lo.shape == hi.shape == (3, 1, 7)
    np.testing.assert_array_equal(lo[:, 0], img.min(1)); np.testing.assert_array_equal(hi[:, 0], img.max(1))
    lo, hi = original_bounds(img, 'image')
    assert lo.shape == hi.shape == (3, 1, 7)
    np.testing.assert_array_equal(lo[:, 0], np.repeat(img.min((1, 2))[:, None], 7, 1))
    np.testing.assert_array_equal(hi[:, 0], np.repeat(img.max((1, 2))[:, None], 7, 1))
    with pytest.raises(ValueError, match='clip'): original_bounds(img, 'row')


@pytest.mark.parametrize('task', range(5))
@pytest.mark.parametrize('kind', ['mri', 'rgb'])
def test_official_column_clip(task, kind):
    "Default clip='column' (official): every pixel stays in its column's original range, per channel."
    img = half_brain() if kind == 'mri' else fundus_like(64)
    if kind == 'rgb': img[:, :, 40:] *= 0.5                                       # columns with a smaller range
    mask = foreground_mask(img) if kind == 'mri' else None
    same = np.stack([half_brain()] * 2) if kind == 'mri' else np.stack([fundus_like(64, seed=s) for s in range(3)])
    lo, hi = img.min(1, keepdims=True), img.max(1, keepdims=True)
    for i in range(25):
        out = apply_task(task, img, sample_rng(12, task, i), mask, same_source=same)
        assert (out >= lo).all() and (out <= hi).all()
        if kind == 'mri': assert (out[:, :, 39:] == 0).all()                     # a column without brain never changes


def test_column_clip_differs_from_image_clip():
    "clip='image' (the evident intent) lets increases reach empty columns; the official column clip erases them."
    img = half_brain(); mask = foreground_mask(img)
    empty = img.max(1)[0] == 0
    reach = 0
    for i in range(60):
        a, info = apply_task(4, img, sample_rng(13, 0, i), mask, clip='image', return_info=True)
        b = apply_task(4, img, sample_rng(13, 0, i), mask)                           # same draws, default 'column'
        if len(info['anomalies']) > 1: continue                                      # one anomaly: the clip is the only difference
        np.testing.assert_array_equal(b, np.clip(a, *original_bounds(img, 'column')))
        reach += int((np.abs(a - img)[0][:, empty] > 1e-3).any())
        if reach: break
    assert reach, "no intensity anomaly reached the empty columns with clip='image'"
    rt = RestorationTask([2, 4], clip='image')
    assert rt.clip == 'image' and "clip='image'" in repr(rt) and RestorationTask([2]).clip == 'column'
    with pytest.raises(ValueError, match='clip'): RestorationTask([2], clip='global')
    with pytest.raises(ValueError, match='clip'): apply_task(2, img, sample_rng(0, 0, 0), mask, clip=None)


def test_push_and_exponent():
    rng = np.random.default_rng(0)
    for A in (0.3, 2.0, 10.0, 40.0, 120.0):
        P = A / math.sqrt(2)
        for _ in range(20):
            push = sample_push(A, rng)
            if 0.5 >= 0.9 * P: assert push == pytest.approx(0.9 * P)
            elif 5 <= 0.1 * P: assert push == pytest.approx(0.1 * P)
            else: assert max(0.1 * P, 0.5) <= push <= min(0.9 * P, 5)
            for sink in (True, False):
                k = push_exponent(A, push, sink)
                assert k >= 1
                q = push / math.sqrt(2)
                x, y = (A / 2 - q, A / 2 + q) if sink else (A / 2 + q, A / 2 - q)
                # the curve d' = f(d) with D = A passes through (x, y): independent closed forms
                y_hat = A - (A - x) ** k / A ** (k - 1) if sink else x ** k / A ** (k - 1)
                assert y_hat == pytest.approx(y, rel=1e-9, abs=1e-12)
                assert radial_map(np.array([x]), A, k, sink)[0] == pytest.approx(y, rel=1e-9, abs=1e-12)


def test_perlin_range_and_smoothness():
    rng = np.random.default_rng(0)
    for shape in [(3, 3), (9, 15), (41, 41), (80, 60)]:
        n = perlin_fractal(shape, rng)
        assert n.shape == shape and n.min() == 0 and n.max() == 1
    n = perlin_fractal((64, 64), np.random.default_rng(1))
    assert np.abs(np.diff(n, axis=0)).mean() < 0.1                                   # smooth, not white noise


def test_source_patch_rotation_and_scale_laws():
    "Measure the realised warp on a linear ramp (reproduced exactly by the cubic spline): scale c^±1 with c-1 ~ Exp(0.1), angle ~ U(-π/4, π/4)."
    yy, xx = np.mgrid[:400, :400]
    ramp = (0.1 + yy / 1000.)[None].astype(np.float64)
    rng = np.random.default_rng(0)
    cs, angles, sgn = [], [], []
    for _ in range(400):
        p, _ = source_patch([ramp], (15, 15), np.zeros((1, 400, 400)), rng, masked=False)
        gy, gx = np.gradient(p[0].astype(float))
        gy, gx = gy[4:-4, 4:-4].mean(), gx[4:-4, 4:-4].mean()
        s = math.hypot(gy, gx) * 1000
        cs.append(max(s, 1 / s)); sgn.append(s > 1); angles.append(math.atan2(gx, gy))
    assert scipy.stats.kstest(np.array(cs) - 1, scipy.stats.expon(scale=0.1).cdf).pvalue > 1e-3
    assert scipy.stats.kstest(angles, scipy.stats.uniform(-math.pi / 4, math.pi / 2).cdf).pvalue > 1e-3
    assert 0.4 < np.mean(sgn) < 0.6


def test_masked_source_patch_is_centred_on_foreground():
    src = np.zeros((1, 100, 100), np.float32); src[0, 60:64, 30:34] = 0.7                # foreground: one 4×4 blob
    rng = np.random.default_rng(0)
    for _ in range(30):
        p, _ = source_patch([src], (11, 11), np.zeros((1, 64, 64), np.float32), rng, masked=True)
        assert p[0, 4:7, 4:7].max() > 0.5                       # the chosen pixel lands within ~1 px of the patch centre


def test_source_box_is_the_official_tight_crop():
    "The spline sees only the box spanned by the grid's outer corners: in ~12% of patches 1–2 far-corner pixels read 0."
    src = np.full((1, 300, 300), 0.5, np.float32); src[0, 0, 0] = 0.                # range [0, 0.5]: a 0 survives the clip
    rng = np.random.default_rng(3)
    hit, where = 0, []
    for _ in range(600):
        p, _ = source_patch([src], (17, 13), np.zeros((1, 64, 64), np.float32), rng, masked=False)
        low = np.argwhere(p[0] < 0.5 - 1e-4)
        if len(low): hit += 1; where += [tuple(q) for q in low]
    assert 0.05 < hit / 600 < 0.25, hit
    assert all(y >= 15 or x >= 11 for y, x in where), where                          # only at the far edges


def test_multisource_one_dataset_per_sample():
    a = np.zeros((3, 1, 64, 64), np.float32) + np.linspace(0, 1, 64)[None, None, None]
    b = a.transpose(0, 1, 3, 2).copy()
    ms = MultiSource(a, b)
    ks = []
    for i in range(300):
        _, info = apply_task(1, BRAIN, sample_rng(14, 0, i), foreground_mask(BRAIN), other_source=ms, return_info=True)
        k = {an['source_index'][0] for an in info['anomalies']}
        assert len(k) == 1                                                           # every anomaly from one dataset
        ks.append(k.pop())
    assert abs(np.mean(ks) - 0.5) < 0.1


def test_channel_matching():
    rng = np.random.default_rng(0)
    consts = np.stack([np.full((40, 40), v, np.float32) for v in (0.2, 0.5, 0.8)])
    seen = set()
    for _ in range(30):
        p, _ = source_patch([consts], (9, 9), np.zeros((1, 40, 40), np.float32), rng, masked=False)
        assert p.shape == (1, 9, 9) and np.ptp(p) < 1e-6
        seen.add(round(float(p[0, 0, 0]), 5))
    assert seen == {0.2, 0.5, 0.8}
    tgt = np.stack([np.full((20, 20), v, np.float32) for v in (0.1, 0.6, 0.9)])      # different size: resized fill
    p, _ = source_patch([np.full((1, 40, 40), 0.3, np.float32)], (9, 9), tgt, rng, masked=False)
    assert p.shape == (3, 9, 9) and np.allclose(p[0], 0.3)
    assert {round(float(p[1, 4, 4]), 5), round(float(p[2, 4, 4]), 5)} < {0.1, 0.6, 0.9}


def test_multisource_picks_datasets_uniformly():
    a = np.zeros((1, 1, 32, 32), np.float32); b = np.ones((9, 1, 32, 32), np.float32)
    ms = MultiSource(a, b)
    assert len(ms) == 10 and ms[0].max() == 0 and ms[5].min() == 1
    rng = np.random.default_rng(0)
    ks = [ms.draw(rng)[1][0] for _ in range(2000)]
    assert abs(np.mean(ks) - 0.5) < 0.05


def test_texture_source():
    for c in (1, 3):
        t = texture_source(c, 32)
        assert t.shape == (len(TEXTURES), c, 32, 32) and t.dtype == np.float32
        assert t.min() == 0 and t.max() == 1 and not t.flags.writeable
    assert texture_source(1, 32) is texture_source(1, 32)                          # cached


# ---------------------------------------------------------------- the wrapper
def test_no_task_frequency():
    img = brain_like(32)
    rt = RestorationTask([4], p_no_aug=0.2)
    n = 3000
    same = sum(np.array_equal(*rt(img, sample_rng(5, 0, i))) for i in range(n))
    # a task can leave an image unchanged only in rare corner cases, so this is ~ the no-task frequency
    assert abs(same / n - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n) + 0.01


def test_task_choice_is_uniform():
    rt = RestorationTask([0, 2, 3], same_source=SAME, p_no_aug=0.2)
    ids = [rt(BRAIN, sample_rng(6, 0, i), return_info=True)[2]['task_id'] for i in range(600)]
    c = np.array([ids.count(t) for t in (None, 0, 2, 3)])
    assert scipy.stats.chisquare(c, np.array([0.2, 0.8 / 3, 0.8 / 3, 0.8 / 3]) * len(ids)).pvalue > 1e-3


def test_reproducible_per_sample():
    rt = RestorationTask([0, 1, 2, 3, 4], same_source=SAME, p_no_aug=0.2)
    a = [rt(BRAIN, sample_rng(7, 1, i))[0] for i in range(20)]
    b = [rt(BRAIN, sample_rng(7, 1, i))[0] for i in reversed(range(20))][::-1]       # order does not matter
    for x, y in zip(a, b): np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, a[0]) for x in a[1:])
    np.testing.assert_array_equal(rt(BRAIN.astype(np.float64), sample_rng(7, 1, 3))[0], a[3])   # float64 input


class _TaskDataset:
    def __init__(self, images, task, seed, epoch=0): self.images, self.task, self.seed, self.epoch = images, task, seed, epoch
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        corrupted, original = self.task(self.images[i], sample_rng(self.seed, self.epoch, i))
        return corrupted, original


def test_identical_across_dataloader_workers():
    torch = pytest.importorskip('torch')
    from torch.utils.data import DataLoader
    images = np.concatenate([SAME, SAME[::-1]])
    ds = _TaskDataset(images, RestorationTask([0, 1, 2, 3, 4], same_source=SAME, p_no_aug=0.2), seed=11)
    runs = []
    for workers, bs in ((0, 3), (2, 2), (2, 5)):
        dl = DataLoader(ds, batch_size=bs, num_workers=workers, shuffle=False)
        runs.append(torch.cat([c for c, _ in dl]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[0], runs[2], rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    rng = np.random.default_rng(0)
    rt = RestorationTask([2])
    with pytest.raises(ValueError, match='C×H×W'): rt(np.zeros((64, 64), np.float32), rng)
    with pytest.raises(ValueError, match='C×H×W'): rt(np.zeros((1, 1, 64, 64), np.float32), rng)
    with pytest.raises(ValueError, match='H×W×C'): rt(np.zeros((64, 64, 3), np.float32), rng)
    with pytest.raises(ValueError, match='empty foreground'): rt(np.full((1, 64, 64), 0.3, np.float32), rng)
    with pytest.raises(ValueError, match='at least 16'): rt(np.ones((1, 8, 40), np.float32), rng)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): rt(BRAIN * 3, rng)
    with pytest.raises(ValueError, match='NaN'): rt(np.full((1, 32, 32), np.nan, np.float32), rng)
    with pytest.raises(ValueError, match='Generator'): rt(BRAIN, 0)
    for bad in (5, -1, 2.0, True, '1'):
        with pytest.raises(ValueError, match='task id'): apply_task(bad, BRAIN, rng)
        with pytest.raises(ValueError, match='task id'): RestorationTask([bad])
    with pytest.raises(ValueError, match='same_source'): apply_task(0, BRAIN, rng)
    with pytest.raises(ValueError, match='empty'): apply_task(0, BRAIN, rng, same_source=[])
    with pytest.raises(ValueError, match='sequence'): apply_task(1, BRAIN, rng, other_source=3)
    with pytest.raises(ValueError, match='C×H×W image'): apply_task(1, BRAIN, rng, foreground_mask(BRAIN), other_source=[np.zeros((32, 32))])
    with pytest.raises(ValueError, match='mask'): apply_task(2, BRAIN, rng, mask=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match='p_no_aug'): RestorationTask([2], p_no_aug=1.5)
    with pytest.raises(ValueError, match='smaller'): find_location(np.ones((40, 9), bool), foreground_regions(None, (32, 32)), rng, (32, 32))


def test_no_endless_loops():
    "Impossible requests end with an error in bounded time."
    rng = np.random.default_rng(0)
    one = np.zeros((128, 128), bool); one[64, 64] = True
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match='5000 tries'): find_location(np.ones((50, 50), bool), foreground_regions(one), rng, (128, 128))
    # a source dataset without any foreground: the official code would recurse forever
    with pytest.raises(ValueError, match='draws'):
        apply_task(0, BRAIN, rng, foreground_mask(BRAIN), same_source=np.zeros((3, 1, 64, 64), np.float32))
    assert time.perf_counter() - t0 < 10
    # a tiny foreground still works (the official tiny-brain check: 1×1, 2×2, 3×3 brains)
    for k in (1, 2, 3):
        img = np.zeros((1, 128, 128), np.float32); img[0, 60:60 + k, 70:70 + k] = 0.8
        for t in (2, 3, 4):
            for i in range(20):
                out = apply_task(t, img, sample_rng(8, t, i), foreground_mask(img))
                assert out.min() >= 0 and out.max() <= 0.8
