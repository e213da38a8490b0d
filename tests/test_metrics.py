"Oracle checks for condiff.metrics: every metric equals scikit-learn's on tie-heavy data, the streaming path included."
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from condiff.metrics import StreamingMetrics, image_metrics, pixel_metrics

TOL = 1e-9


def _official_pixel(targets, preds):
    "UPD `compute_average_precision_and_optimal_dice` (spec §6): sklearn PR curve, AP = -sum(diff(R)*P[:-1]), nanmax Dice."
    precision, recall, _ = precision_recall_curve(targets.reshape(-1), preds.reshape(-1))
    ap = -np.sum(np.diff(recall) * precision[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * precision * recall / (precision + recall)
    return ap, dice[np.nanargmax(dice)]


def _tie_heavy(seed, shape, dtype=np.float16, zero_frac=0.5, levels=None):
    "Maps in [0,1] with many exact zeros, quantised (float16 or `levels` steps), masks correlated with the maps."
    rng = np.random.default_rng(seed)
    v = rng.random(shape) ** 2
    if levels: v = np.round(v * levels) / levels
    v[rng.random(shape) < zero_frac] = 0
    v = v.astype(dtype)
    m = rng.random(shape) < 0.02 + 0.5 * v.astype(np.float64) ** 2
    m[: max(1, shape[0] // 4)] = False  # some healthy images
    return v, m


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 20])
def test_image_metrics_equal_sklearn(seed, levels):
    rng = np.random.default_rng(100 + seed)
    n = 300
    scores = rng.random(n)
    if levels: scores = np.round(scores * levels) / levels  # heavy ties
    scores[rng.random(n) < 0.3] = 0
    labels = rng.random(n) < 0.2 + 0.6 * scores
    got = image_metrics(labels, scores)
    assert abs(got["AP_i"] - average_precision_score(labels, scores)) < TOL
    assert abs(got["AUROC"] - roc_auc_score(labels, scores)) < TOL
    # torch in, float32 scores, int labels: same as sklearn on the same values
    s32 = scores.astype(np.float32)
    got32 = image_metrics(torch.tensor(labels.astype(np.int64)), torch.tensor(s32))
    assert abs(got32["AP_i"] - average_precision_score(labels, s32)) < TOL
    assert abs(got32["AUROC"] - roc_auc_score(labels, s32)) < TOL


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_equal_sklearn(dtype, seed):
    v, m = _tie_heavy(seed, (20, 1, 24, 24), dtype=np.float16)
    v = v.astype(dtype)
    if dtype != np.float16:  # values that are not float16: continuous values on half of the nonzero pixels
        rng = np.random.default_rng(seed)
        cont = (rng.random(v.shape) * (v > 0)).astype(dtype)
        v = np.where(rng.random(v.shape) < 0.5, v, cont)
    got = pixel_metrics(m, v)
    vf = v.astype(np.float64)
    assert abs(got["AP_p"] - average_precision_score(m.reshape(-1), vf.reshape(-1))) < TOL
    ap, dice = _official_pixel(m, vf)
    assert abs(got["AP_p"] - ap) < TOL
    assert abs(got["max_Dice"] - dice) < TOL


def test_pixel_metrics_routes_agree_and_negative_zero():
    v, m = _tie_heavy(11, (10, 1, 16, 16), dtype=np.float16, levels=8)
    v[0, 0, :4, :4] = -0.0  # -0.0 ties with 0.0 (sklearn: equal values)
    ref_ap, ref_dice = _official_pixel(m, v.astype(np.float64))
    for x in (v, v.astype(np.float32), v.astype(np.float64), torch.tensor(v), torch.tensor(v).to(torch.bfloat16)):
        got = pixel_metrics(m, x) if not (isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16) else None
        if got is None:  # bfloat16 rounds the values: compare with sklearn on the rounded values
            xr = torch.tensor(v).to(torch.bfloat16).float().numpy().astype(np.float64)
            got, (ref_ap_b, ref_dice_b) = pixel_metrics(m, x), _official_pixel(m, xr)
            assert abs(got["AP_p"] - ref_ap_b) < TOL and abs(got["max_Dice"] - ref_dice_b) < TOL
            continue
        assert abs(got["AP_p"] - ref_ap) < TOL and abs(got["max_Dice"] - ref_dice) < TOL
    # negative values (allowed by the exact function): handled by the sorting route
    got = pixel_metrics(m, v.astype(np.float32) - 0.5)
    ap, dice = _official_pixel(m, v.astype(np.float64) - 0.5)
    assert abs(got["AP_p"] - ap) < TOL and abs(got["max_Dice"] - dice) < TOL


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_mixed_signs_and_zeros(seed):
    "The exact sorting route on negative, zero and positive values, with positives among the zeros."
    rng = np.random.default_rng(70 + seed)
    v = np.round(rng.standard_normal((8, 1, 20, 20)), 1)  # heavy ties
    v[rng.random(v.shape) < 0.4] = 0
    m = rng.random(v.shape) < 0.1 + 0.2 * (v > 0)
    ap, dice = _official_pixel(m, v)
    got = pixel_metrics(m, v)
    assert abs(got["AP_p"] - ap) < TOL and abs(got["max_Dice"] - dice) < TOL
    assert abs(got["AP_p"] - average_precision_score(m.reshape(-1), v.reshape(-1))) < TOL


def test_pixel_metrics_uint8_masks_and_integer_maps():
    rng = np.random.default_rng(3)
    maps = rng.integers(0, 5, (6, 1, 8, 8))
    masks = (rng.random((6, 1, 8, 8)) < 0.3).astype(np.uint8)
    ap, dice = _official_pixel(masks.astype(bool), maps.astype(np.float64))
    got = pixel_metrics(masks, maps)
    assert abs(got["AP_p"] - ap) < TOL and abs(got["max_Dice"] - dice) < TOL


@pytest.mark.parametrize("seed", range(3))
def test_streaming_equals_sklearn_exactly_for_float16(seed):
    v, m = _tie_heavy(20 + seed, (30, 1, 16, 16))
    scores = v.astype(np.float64).reshape(30, -1).mean(1)
    labels = m.reshape(30, -1).any(1)
    ap, dice = _official_pixel(m, v.astype(np.float64))
    results = []
    for splits in ([30], [7, 7, 16], [1] * 30):
        sm = StreamingMetrics()
        i = 0
        for k in splits:  # several update() calls, torch and numpy mixed
            batch = (torch.tensor(m[i:i + k]), torch.tensor(v[i:i + k])) if i % 2 else (m[i:i + k], v[i:i + k])
            sm.update(*batch)
            i += k
        r = sm.compute()
        assert sm.exact and sm.n_pixels == v.size and sm.n_images == 30
        assert abs(r["AP_p"] - ap) < TOL and abs(r["max_Dice"] - dice) < TOL
        assert abs(r["AP_i"] - average_precision_score(labels, scores)) < TOL
        assert abs(r["AUROC"] - roc_auc_score(labels, scores)) < TOL
        assert sm.bounds() == {"AP_p": (r["AP_p"], r["AP_p"]), "max_Dice": (r["max_Dice"], r["max_Dice"])}
        results.append(r)
    assert results[0] == results[1] == results[2]  # batching never changes a number


def test_streaming_float16_values_given_as_float32_are_exact_and_explicit_scores():
    v, m = _tie_heavy(30, (12, 1, 16, 16))
    rng = np.random.default_rng(0)
    scores, labels = rng.random(12), rng.random(12) < 0.5
    sm = StreamingMetrics()
    sm.update(m[:5], v[:5].astype(np.float32), scores=scores[:5], labels=labels[:5])
    sm.update(torch.tensor(m[5:]), torch.tensor(v[5:]).float(), scores=torch.tensor(scores[5:]), labels=labels[5:])
    assert sm.exact
    r = sm.compute()
    ap, dice = _official_pixel(m, v.astype(np.float64))
    assert abs(r["AP_p"] - ap) < TOL and abs(r["max_Dice"] - dice) < TOL
    assert abs(r["AP_i"] - average_precision_score(labels, scores)) < TOL
    assert abs(r["AUROC"] - roc_auc_score(labels, scores)) < TOL


def test_streaming_merge_equals_single_accumulator():
    v, m = _tie_heavy(40, (16, 1, 16, 16))
    c = (np.random.default_rng(1).random(v.shape) * (v > 0)).astype(np.float32)  # a float32 part too
    one = StreamingMetrics().update(m, v).update(m, c)
    a, b = StreamingMetrics().update(m[:9], v[:9]).update(m, c), StreamingMetrics().update(m[9:], v[9:])
    assert a.merge(b).compute() == one.compute()
    assert a.bounds() == one.bounds()


@pytest.mark.parametrize("seed", range(3))
def test_streaming_float32_within_bound_of_sklearn(seed):
    rng = np.random.default_rng(50 + seed)
    shape = (40, 1, 32, 32)
    v = rng.random(shape).astype(np.float32) ** 3
    v[rng.random(shape) < 0.5] = 0
    m = rng.random(shape) < 0.01 + 0.3 * v
    m[:10] = False  # healthy images
    ap, dice = _official_pixel(m, v)
    sm = StreamingMetrics()
    for i in range(0, 40, 13):
        sm.update(m[i:i + 13], v[i:i + 13])
    r, b = sm.compute(), sm.bounds()
    assert not sm.exact
    assert abs(r["AP_p"] - ap) <= 1e-4 and abs(r["max_Dice"] - dice) <= 1e-4
    assert b["AP_p"][0] - 1e-12 <= ap <= b["AP_p"][1] + 1e-12
    assert b["max_Dice"][0] - 1e-12 <= dice <= b["max_Dice"][1] + 1e-12
    assert b["AP_p"][1] - b["AP_p"][0] < 1e-3
    # float64 maps: rounded to float32 first, still within the bound
    v64 = rng.random(shape) * (v > 0)
    sm64 = StreamingMetrics().update(m, v64)
    ap64, dice64 = _official_pixel(m, v64)
    b64 = sm64.bounds()
    assert b64["AP_p"][0] - 1e-12 <= ap64 <= b64["AP_p"][1] + 1e-12
    assert b64["max_Dice"][0] - 1e-12 <= dice64 <= b64["max_Dice"][1] + 1e-12


def test_streaming_bounds_hold_on_adversarial_data():
    "All values inside one float32 bin (a 2**-15 relative band): the histogram sees one big tie; the bounds still hold."
    rng = np.random.default_rng(7)
    base = np.float32(0.5)
    bits = base.view(np.uint32) + rng.integers(1, 200, 4000).astype(np.uint32)  # 0.5 + up to 200 ulps
    v = np.sort(bits.view(np.float32))
    m = np.zeros(v.size, bool)
    m[-800:] = True  # the largest values are the anomalies: exact AP = 1 (up to ties)
    v, m = v.reshape(40, 1, 10, 10), m.reshape(40, 1, 10, 10)
    ap, dice = _official_pixel(m, v)
    sm = StreamingMetrics().update(m, v)
    r, b = sm.pixel_metrics(), sm.bounds()
    assert b["AP_p"][0] - 1e-12 <= ap <= b["AP_p"][1] + 1e-12
    assert b["max_Dice"][0] - 1e-12 <= dice <= b["max_Dice"][1] + 1e-12
    assert b["AP_p"][0] <= r["AP_p"] <= b["AP_p"][1]
    assert abs(r["AP_p"] - ap) > 0.05  # the tie really changed AP here ...
    assert b["AP_p"][1] - b["AP_p"][0] > 0.05  # ... and the reported interval says so


def test_streaming_does_not_hold_pixels():
    "Memory is the histograms, not the pixels: state size is independent of how many pixels were fed."
    sm = StreamingMetrics()
    rng = np.random.default_rng(0)
    for _ in range(5):
        v = rng.random((8, 1, 64, 64)).astype(np.float16)
        sm.update(rng.random(v.shape) < 0.1, v)
    state = sm.tot16.nbytes + sm.pos16.nbytes
    assert state == 2 * 65536 * 8 and sm.tot32 is None
    assert sm.n_pixels == 5 * 8 * 64 * 64


@pytest.mark.parametrize("call,msg", [
    (lambda: image_metrics([0, 1, 1], [0.1, 0.2]), "differ in shape"),
    (lambda: image_metrics([], []), "empty"),
    (lambda: image_metrics([0, 1], [np.nan, 0.2]), "NaN"),
    (lambda: image_metrics([0, 0], [0.1, 0.2]), "only one class"),
    (lambda: image_metrics([1, 1], [0.1, 0.2]), "only one class"),
    (lambda: image_metrics([0, 3], [0.1, 0.2]), "binary"),
    (lambda: pixel_metrics(np.ones((2, 4)), np.ones((2, 5))), "differ in shape"),
    (lambda: pixel_metrics(np.ones((0, 4)), np.ones((0, 4))), "empty"),
    (lambda: pixel_metrics(np.zeros((2, 4)), np.ones((2, 4))), "no positive pixel"),
    (lambda: pixel_metrics(np.ones((2, 4)), np.full((2, 4), np.inf)), "NaN or Inf|infinite"),
    (lambda: pixel_metrics(np.ones((2, 4)), np.full((2, 4), np.nan, np.float32)), "NaN"),
    (lambda: pixel_metrics(np.ones((2, 4)), np.full((2, 4), np.nan, np.float16)), "NaN"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 5)), np.ones((2, 1, 4, 4))), "differ in shape"),
    (lambda: StreamingMetrics().update(np.ones((0, 1, 4, 4)), np.ones((0, 1, 4, 4))), "non-empty"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.full((2, 1, 4, 4), -0.25, np.float16)), "negative"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.full((2, 1, 4, 4), -0.3)), "negative"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.full((2, 1, 4, 4), np.nan)), "NaN"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.full((2, 1, 4, 4), np.inf, np.float16)), "infinite"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.ones((2, 1, 4, 4)), labels=[1]), "1 labels for 2"),
    (lambda: StreamingMetrics().update(np.full((2, 1, 4, 4), 0.5), np.ones((2, 1, 4, 4))), "binary"),
    (lambda: StreamingMetrics().compute(), "update\\(\\) first"),
    (lambda: StreamingMetrics().update(np.zeros((2, 1, 4, 4)), np.ones((2, 1, 4, 4))).pixel_metrics(), "no positive pixel"),
    (lambda: StreamingMetrics().update(np.ones((2, 1, 4, 4)), np.ones((2, 1, 4, 4))).compute(), "only one class"),
    (lambda: StreamingMetrics().image_metrics(), "update\\(\\) first"),
])
def test_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_failed_update_leaves_state_unchanged():
    v, m = _tie_heavy(60, (6, 1, 8, 8))
    sm = StreamingMetrics().update(m, v)
    before = (sm.tot16.copy(), sm.pos16.copy(), sm.n_images)
    bad = v.astype(np.float32)
    bad[-1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        sm.update(m, bad)
    with pytest.raises(ValueError):
        sm.update(m, v, scores=np.zeros(5))
    assert np.array_equal(before[0], sm.tot16) and np.array_equal(before[1], sm.pos16) and before[2] == sm.n_images
    assert sm.tot32 is None


# ----------------------------------------------------------------------------------------------- restoration quality

def test_restoration_quality_hand_computed():
    """ŷ = y removes nothing (0); ŷ = x_h removes everything (1); a hand-computed partial case; healthy fidelity is the
    mean |ŷ − y| over healthy foreground pixels (background and lesion excluded)."""
    from condiff.metrics import restoration_quality, RestorationMeter
    y = np.zeros((2, 1, 3, 3), np.float32); h = np.zeros_like(y); m = np.zeros((2, 1, 3, 3), bool)
    y[0, 0] = [[0.9, 0.5, 0.5], [0.5, 0.8, 0.5], [0, 0, 0]]; h[0, 0] = [[0.3, 0.5, 0.5], [0.5, 0.4, 0.5], [0, 0, 0]]
    m[0, 0, 0, 0] = m[0, 0, 1, 1] = True
    y[1, 0] = h[1, 0] = [[0.2, 0.2, 0], [0.2, 0.2, 0], [0, 0, 0]]  # a healthy slice
    assert restoration_quality(y, y, h, m)['lesion_removal'] == 0.0
    assert restoration_quality(y, h, h, m)['lesion_removal'] == 1.0
    r = y.copy(); r[0, 0, 0, 0] = 0.6; r[0, 0, 1, 1] = 0.8; r[1, 0, 0, 0] = 0.3  # removes 0.3 of 1.0 total excess
    q = restoration_quality(y, r, h, m)
    assert abs(q['lesion_removal'] - 0.3) < 1e-6
    # healthy foreground: 4 pixels of slice 0 (6 above 0, 2 of them lesion) + 4 of slice 1; one moved by 0.1
    assert abs(q['healthy_fidelity'] - 0.1 / 8) < 1e-7 and q['n_healthy_px'] == 8 and q['n_lesion_px'] == 2
    parts = RestorationMeter().update(y[:1], r[:1], h[:1], m[:1]).merge(RestorationMeter().update(y[1:], r[1:], h[1:], m[1:]))
    assert parts.compute() == q
    with pytest.raises(ValueError, match='healthy shape'):
        restoration_quality(y, r, h[:1], m)
