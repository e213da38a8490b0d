"""Fidelity oracles for condiff.ddpm: diffusers' DDPMScheduler / DDIMScheduler / add_noise / compute_snr and the
official training-loss formula, plus per-sample seeding and input validation."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor

from condiff.ddpm import (PREDICTION_TYPES, DDIMSampler, DDPMSampler, NoiseSchedule, diffusion_loss, eps_from_prediction,
                          min_snr_weight, offset_noise, prediction_target, q_sample, restore, sample_timesteps)

SHAPE = (3, 2, 12, 12)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- schedule

def test_schedule_equals_diffusers():
    ref, s = DDPMScheduler(), NoiseSchedule()
    assert torch.equal(s.betas, ref.betas) and torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    assert s.alphas_cumprod.dtype == torch.float32
    # values quoted in method_spec §2
    assert abs(s.alphas_cumprod[0].item() - 0.9999) < 1e-7
    assert abs(s.alphas_cumprod[980].item() - 5.9e-5) < 0.05e-5
    assert abs(s.alphas_cumprod[999].item() - 4.0e-5) < 0.05e-5


def test_leading_timesteps_equal_diffusers_for_every_step_count():
    ref, s = DDPMScheduler(), DDPMSampler()
    for n in range(1, 1001):
        ref.set_timesteps(n)
        s.set_timesteps(n)
        assert torch.equal(s.timesteps, ref.timesteps), n
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(980, -1, -20))


# ----------------------------------------------------------------------------------------------- DDPM sampler

def _eps_model(kind, x, t, sched, x0_target, g):
    "Model outputs for the oracle runs: pure random ε̂, or a near-ideal ε̂ so that x̂0 is mostly not clipped."
    if kind == 'random':
        return torch.randn(x.shape, generator=g)
    ab = sched.alphas_cumprod[t]
    return (x - ab.sqrt() * x0_target) / (1 - ab).sqrt() + 0.3 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize('n', [50, 10, 25, 1000, 3, 7, 1])
@pytest.mark.parametrize('kind', ['random', 'near_ideal'])
def test_ddpm_trajectory_equals_diffusers_with_generator(n, kind):
    ref, s = DDPMScheduler(), DDPMSampler()
    ref.set_timesteps(n)
    s.set_timesteps(n)
    assert torch.equal(s.timesteps, ref.timesteps)
    g_eps = gen(100 + n)
    x0_target = torch.rand(SHAPE, generator=g_eps) * 1.6 - 0.8
    x_ref = x_ours = torch.randn(SHAPE, generator=g_eps)
    g_ref, g_ours = gen(7), gen(7)
    worst = 0.0
    for t in ref.timesteps:
        eps = _eps_model(kind, x_ref, int(t), s.schedule, x0_target, g_eps)
        out = ref.step(eps, t, x_ref, generator=g_ref)
        x_ours, x0_ours = s.step(eps, t, x_ours, generator=g_ours, return_x0=True)
        worst = max(worst, maxdiff(x_ours, out.prev_sample), maxdiff(x0_ours, out.pred_original_sample))
        x_ref = out.prev_sample
        assert worst <= 1e-6, (int(t), worst)
    # the last step returns the clipped x̂0
    assert torch.equal(x_ours, s.pred_x0) and x_ours.abs().max() <= 1
    if kind == 'near_ideal' and n >= 10:  # the oracle run is not trivially all-clipped
        assert (x0_ours.abs() < 0.99).float().mean() > 0.5


@pytest.mark.parametrize('n', [50, 10])
def test_ddpm_trajectory_equals_diffusers_with_injected_noise(n):
    "Explicit `noise=`: z is reproduced from a copy of the generator state diffusers draws its variance noise from."
    ref, s = DDPMScheduler(), DDPMSampler()
    ref.set_timesteps(n)
    s.set_timesteps(n)
    g_eps, g_ref = gen(1), gen(2)
    x_ref = x_ours = torch.randn(SHAPE, generator=g_eps)
    for t in ref.timesteps:
        eps = torch.randn(SHAPE, generator=g_eps)
        z = torch.randn(SHAPE, generator=torch.Generator().set_state(g_ref.get_state()))
        x_ref = ref.step(eps, t, x_ref, generator=g_ref).prev_sample
        x_ours = s.step(eps, t, x_ours, noise=z)
        assert maxdiff(x_ours, x_ref) <= 1e-6


def test_ddpm_per_sample_generator_list_equals_diffusers():
    ref, s = DDPMScheduler(), DDPMSampler()
    ref.set_timesteps(20)
    s.set_timesteps(20)
    seeds = [3, 1, 4]
    g_ref, g_ours, g_eps = [gen(k) for k in seeds], [gen(k) for k in seeds], gen(9)
    x_ref = x_ours = torch.randn(SHAPE, generator=g_eps)
    for t in ref.timesteps:
        eps = torch.randn(SHAPE, generator=g_eps)
        x_ref = ref.step(eps, t, x_ref, generator=g_ref).prev_sample
        x_ours = s.step(eps, t, x_ours, generator=g_ours)
        assert maxdiff(x_ours, x_ref) <= 1e-6


def test_ddpm_step_mean_and_variance_against_float64_formula():
    "Independent of diffusers: Ho et al.'s posterior with ᾱ_prev = ᾱ_{t-k}, checked via zero noise and unit noise."
    s = DDPMSampler().set_timesteps(50)
    ab = s.schedule.alphas_cumprod.double()
    g = gen(5)
    x, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g) * 0.1
    for t in [980, 500, 20]:
        a, ap = ab[t], ab[t - 20]
        x0 = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).clamp(-1, 1)
        beta = 1 - a / ap
        mu = ap.sqrt() * beta / (1 - a) * x0 + (a / ap).sqrt() * (1 - ap) / (1 - a) * x.double()
        sigma = ((1 - ap) / (1 - a) * beta).sqrt()
        m = s.step(eps, t, x, noise=torch.zeros(SHAPE))
        one = s.step(eps, t, x, noise=torch.ones(SHAPE))
        assert maxdiff(m, mu) < 1e-5
        assert abs((one - m).double().mean().item() - sigma.item()) < 1e-6


# ----------------------------------------------------------------------------------------------- DDIM sampler

@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('n', [50, 10, 7])
@pytest.mark.parametrize('clip,one', [(True, True), (False, False)])
def test_ddim_trajectory_equals_diffusers(eta, n, clip, one):
    ref = DDIMScheduler(clip_sample=clip, set_alpha_to_one=one)
    s = DDIMSampler(eta=eta, clip_sample=clip, set_alpha_to_one=one)
    ref.set_timesteps(n)
    s.set_timesteps(n)
    assert torch.equal(s.timesteps, ref.timesteps)
    g_eps = gen(11 + n)
    x0_target = torch.rand(SHAPE, generator=g_eps) * 1.6 - 0.8
    x_ref = x_ours = torch.randn(SHAPE, generator=g_eps)
    g_ref, g_ours = gen(5), gen(5)
    for t in ref.timesteps:
        eps = _eps_model('near_ideal', x_ref, int(t), s.schedule, x0_target, g_eps)
        out = ref.step(eps, t, x_ref, eta=eta, generator=g_ref)
        x_ours, x0 = s.step(eps, t, x_ours, generator=g_ours, return_x0=True)
        assert maxdiff(x_ours, out.prev_sample) <= 1e-6 and maxdiff(x0, out.pred_original_sample) <= 1e-6
        x_ref = out.prev_sample


def test_ddim_injected_noise_equals_diffusers_variance_noise():
    ref, s = DDIMScheduler(), DDIMSampler(eta=1.0)
    ref.set_timesteps(25)
    s.set_timesteps(25)
    g = gen(8)
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    for t in ref.timesteps:
        eps, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        x_ref = ref.step(eps, t, x_ref, eta=1.0, variance_noise=z).prev_sample
        x_ours = s.step(eps, t, x_ours, noise=z)
        assert maxdiff(x_ours, x_ref) <= 1e-6


def test_ddim_1000_steps_equals_diffusers():
    ref, s = DDIMScheduler(), DDIMSampler(eta=1.0)
    ref.set_timesteps(1000)
    s.set_timesteps(1000)
    g_eps, g_ref, g_ours = gen(0), gen(1), gen(1)
    x_ref = x_ours = torch.randn(1, 1, 4, 4, generator=g_eps)
    for t in ref.timesteps:
        eps = torch.randn(1, 1, 4, 4, generator=g_eps)
        x_ref = ref.step(eps, t, x_ref, eta=1.0, generator=g_ref).prev_sample
        x_ours = s.step(eps, t, x_ours, generator=g_ours)
    assert maxdiff(x_ours, x_ref) <= 1e-6


# ----------------------------------------------------------------------------------------------- forward process

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_q_sample_equals_add_noise(dtype):
    ref, s, g = DDPMScheduler(), NoiseSchedule(), gen(3)
    x0 = torch.rand(8, 3, 10, 10, generator=g, dtype=dtype)
    noise = torch.randn(8, 3, 10, 10, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 258, 259, 500, 980, 998, 999])
    got = q_sample(s, x0, t, noise)
    assert got.dtype == dtype
    assert maxdiff(got, ref.add_noise(x0, noise, t)) == 0.0
    # and against the closed form in float64
    ab = s.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    assert maxdiff(got, ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()) < 1e-6


def test_offset_noise_follows_official_code():
    "The official compute_loss: noise = randn_like(x0); noise += 0.1 * randn((B, C, 1, 1)) (global RNG)."
    x0 = torch.rand(4, 3, 16, 16)
    torch.manual_seed(123)
    ref = torch.randn_like(x0)
    ref += 0.1 * torch.randn((x0.shape[0], x0.shape[1], 1, 1), device=x0.device)
    torch.manual_seed(123)
    assert torch.equal(offset_noise(x0), ref)
    # statistics of the offset term over many samples: per-plane means have variance 0.01 + 1/(H·W)
    e = offset_noise(torch.zeros(4000, 2, 8, 8), generator=gen(0))
    assert abs(e.mean((2, 3)).var().item() - (0.01 + 1 / 64)) < 0.002


def test_offset_noise_and_timesteps_per_sample_streams():
    x = torch.zeros(5, 2, 6, 6)
    seeds = [10, 11, 12, 13, 14]
    batch = offset_noise(x, generator=[gen(k) for k in seeds])
    for i in [0, 3]:
        assert torch.equal(batch[i:i + 1], offset_noise(x[:1], generator=[gen(seeds[i])]))
    s = NoiseSchedule()
    tb = sample_timesteps(s, 5, generator=[gen(k) for k in seeds])
    assert tb.dtype == torch.long and tb.shape == (5,)
    assert tb[2] == sample_timesteps(s, 1, generator=[gen(12)])[0]
    t = sample_timesteps(s, 100_000, generator=gen(1))
    counts = torch.bincount(t, minlength=1000)
    assert t.min() == 0 and t.max() == 999 and counts.min() > 40  # every timestep drawn (expected 100 each)


# ----------------------------------------------------------------------------------------------- Min-SNR and loss

@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_min_snr_weight_equals_diffusers_training_formula(gamma):
    ref, s = DDPMScheduler(), NoiseSchedule()
    t = torch.arange(1000)
    snr = compute_snr(ref, t)
    # examples/text_to_image/train_text_to_image.py, prediction_type == "epsilon"
    w_ref = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    assert torch.equal(s.snr(t), snr)
    assert maxdiff(min_snr_weight(s, t, gamma), w_ref) <= 1e-7
    # independent float64 formula
    ab = s.alphas_cumprod.double()
    snr64 = ab / (1 - ab)
    assert maxdiff(min_snr_weight(s, t, gamma), torch.clamp(snr64, max=gamma) / snr64) < 1e-5
    if gamma == 1.0:
        assert int((snr64 > 1).sum()) == 259  # method_spec §1.3: SNR > 1 exactly for t < 259


def _toy_model(x_t, t, cond):
    return torch.tanh(x_t * 0.7 + cond) * (t.float() / 1000).view(-1, 1, 1, 1) - 0.1 * cond


@pytest.mark.parametrize('gamma', [1.0, None])
def test_diffusion_loss_equals_training_example(gamma):
    ref, s, g = DDPMScheduler(), NoiseSchedule(), gen(4)
    x0 = torch.rand(6, 1, 16, 16, generator=g)
    cond = x0.flip(-1)
    noise = offset_noise(x0, generator=g)
    t = torch.tensor([0, 5, 100, 258, 600, 999])
    # the official compute_loss, written with diffusers' pieces
    noisy = ref.add_noise(x0, noise, t)
    pred = _toy_model(noisy, t, cond)
    loss = F.mse_loss(pred.float(), noise.float(), reduction='none')
    loss = loss.mean(dim=list(range(1, len(loss.shape))))
    if gamma is not None:
        snr = compute_snr(ref, t)
        loss = loss * (torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr)
    expected = loss.mean()
    got = diffusion_loss(_toy_model, x0, cond, s, t, noise, snr_gamma=gamma)
    assert got.ndim == 0 and abs(got.item() - expected.item()) <= 1e-6 * max(1.0, abs(expected.item()))
    per = diffusion_loss(_toy_model, x0, cond, s, t, noise, snr_gamma=gamma, reduction='none')
    assert maxdiff(per, loss) <= 1e-6


def test_diffusion_loss_gradient_flows():
    s = NoiseSchedule()
    w = torch.tensor(0.5, requires_grad=True)
    x0 = torch.rand(2, 1, 8, 8)
    loss = diffusion_loss(lambda x, t, c: w * x, x0, x0, s, torch.tensor([10, 700]), torch.randn(2, 1, 8, 8))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad)


# ----------------------------------------------------------------------------------------------- restore

def _ideal_eps(x_t, t, target):
    "The ε that maps `target` to x_t exactly (an ideal denoiser for a point-mass data distribution)."
    ab = NoiseSchedule().alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * target) / (1 - ab).sqrt()


def _conv_model():
    "A per-sample but spatially mixing model: 0.9·ideal ε towards 0.6·tanh(cond) plus a small 3×3 conv term."
    k = torch.randn(1, 2, 3, 3, generator=gen(0)) * 0.2

    def model(x_t, t, cond):
        h = F.conv2d(torch.cat([x_t, cond], 1), k.to(x_t.device), padding=1)
        return 0.9 * _ideal_eps(x_t, t, 0.6 * torch.tanh(cond)) + 0.1 * torch.tanh(h)
    return model


def _elementwise_model(x_t, t, cond):
    return 0.9 * _ideal_eps(x_t, t, 0.6 * torch.tanh(cond)) + 0.1 * torch.tanh(x_t)


@pytest.mark.parametrize('sampler,n', [(lambda: DDPMSampler(), 50), (lambda: DDIMSampler(eta=0.5), 20),
                                       (lambda: DDIMSampler(eta=0.0), 20)])
def test_restore_per_sample_seeds_independent_of_batch(sampler, n):
    g = gen(2)
    cond = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1
    seeds = [101, 202, 303, 404, 505]
    for model, exact in [(_elementwise_model, True), (_conv_model(), False)]:
        full = restore(model, cond, sampler(), n, seeds=seeds)
        perm = [3, 0, 4, 2, 1]
        permuted = restore(model, cond[perm], sampler(), n, seeds=[seeds[i] for i in perm])
        for j, i in enumerate(perm):
            alone = restore(model, cond[i:i + 1], sampler(), n, seeds=[seeds[i]])
            for other in (full[i:i + 1], permuted[j:j + 1]):
                if exact:
                    assert torch.equal(alone, other)
                else:
                    assert maxdiff(alone, other) <= 1e-6
        # the check is not vacuous: restorations are mostly unclipped and depend on the seed
        assert (full.abs() < 0.99).float().mean() > 0.5
        assert maxdiff(restore(model, cond[:1], sampler(), n, seeds=[1]),
                       restore(model, cond[:1], sampler(), n, seeds=[2])) > 1e-3


def test_restore_equals_diffusers_loop_with_generator_list():
    "restore(seeds=...) = the diffusers sampling loop of the official code, given one generator per sample."
    model = _conv_model()
    cond = torch.rand(3, 1, 16, 16, generator=gen(6))
    seeds = [5, 6, 7]
    got = restore(model, cond, DDPMSampler(), 50, seeds=seeds)
    ref = DDPMScheduler()
    ref.set_timesteps(50)
    gens = [gen(k) for k in seeds]
    x = diffusers_randn_tensor(cond.shape, generator=gens, device=cond.device, dtype=cond.dtype)
    for t in ref.timesteps:
        eps = model(x, torch.full((3,), int(t), dtype=torch.long), cond)
        x = ref.step(eps, t, x, generator=gens).prev_sample
    assert maxdiff(got, x) <= 1e-6


def test_restore_calls_model_with_long_timesteps_and_cond():
    cond = torch.rand(2, 1, 8, 8)
    seen = []

    def model(x_t, t, c):
        assert t.dtype == torch.long and t.shape == (2,) and c is cond and x_t.shape == cond.shape
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)
    steps = []
    restore(model, cond, DDPMSampler(), 10, seeds=[1, 2], callback=lambda i, t, x, x0: steps.append((i, t)))
    assert seen == list(range(900, -1, -100))
    assert steps == list(enumerate(seen))


def test_restore_global_and_single_generator():
    cond = torch.rand(2, 1, 8, 8)
    a = restore(_elementwise_model, cond, DDPMSampler(), 5, generator=gen(3))
    b = restore(_elementwise_model, cond, DDPMSampler(), 5, generator=gen(3))
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = restore(_elementwise_model, cond, DDPMSampler(), 5)
    torch.manual_seed(0)
    assert torch.equal(c, restore(_elementwise_model, cond, DDPMSampler(), 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_restore_cuda_matches_cpu():
    model = _conv_model()
    cond = torch.rand(4, 1, 32, 32, generator=gen(1))
    cpu = restore(model, cond, DDPMSampler(), 50, seeds=[1, 2, 3, 4])
    cuda = restore(model, cond.cuda(), DDPMSampler(), 50, seeds=[1, 2, 3, 4])
    assert cuda.device.type == 'cuda' and maxdiff(cuda.cpu(), cpu) < 1e-4
    d = restore(model, cond.cuda(), DDIMSampler(eta=1.0), 20, seeds=[1, 2, 3, 4])
    assert maxdiff(d.cpu(), restore(model, cond, DDIMSampler(eta=1.0), 20, seeds=[1, 2, 3, 4])) < 1e-4
    s = NoiseSchedule()
    x0 = cond.cuda()
    t = torch.tensor([0, 10, 500, 999], device='cuda')
    loss = diffusion_loss(model, x0, x0, s, t, offset_noise(x0, generator=[gen(k) for k in range(4)]))
    loss_cpu = diffusion_loss(model, cond, cond, s, t.cpu(), offset_noise(cond, generator=[gen(k) for k in range(4)]))
    assert abs(loss.item() - loss_cpu.item()) < 1e-5


# ----------------------------------------------------------------------------------------------- bad input

def _ready(sampler):
    return sampler.set_timesteps(50)


X = torch.zeros(2, 1, 8, 8)
NAN = torch.full((2, 1, 8, 8), float('nan'))
S = NoiseSchedule()
ZERO = lambda x, t, c: torch.zeros_like(x)  # noqa: E731

BAD = {
    'q_sample t too large': (lambda: q_sample(S, X, torch.tensor([0, 1000]), X), 'out of range'),
    'q_sample t negative': (lambda: q_sample(S, X, torch.tensor([-1, 3]), X), 'out of range'),
    'q_sample t wrong length': (lambda: q_sample(S, X, torch.tensor([1, 2, 3]), X), 'one timestep per sample'),
    'q_sample t 2-D': (lambda: q_sample(S, X, torch.tensor([[1, 2]]), X), 'one timestep per sample'),
    'q_sample t float': (lambda: q_sample(S, X, torch.tensor([1.0, 2.0]), X), 'integer timesteps'),
    'q_sample NaN x0': (lambda: q_sample(S, NAN, 3, X), 'x0 contains NaN'),
    'q_sample NaN noise': (lambda: q_sample(S, X, 3, NAN), 'noise contains NaN'),
    'q_sample noise shape': (lambda: q_sample(S, X, 3, X[:, :, :4]), 'does not match'),
    'q_sample empty': (lambda: q_sample(S, X[:0], torch.tensor([], dtype=torch.long), X[:0]), 'empty batch'),
    'snr out of range': (lambda: min_snr_weight(S, torch.tensor([1000])), 'out of range'),
    'gamma <= 0': (lambda: min_snr_weight(S, torch.tensor([3]), gamma=0.0), 'gamma'),
    'loss NaN cond': (lambda: diffusion_loss(ZERO, X, NAN, S, torch.tensor([1, 2]), X), 'cond contains NaN'),
    'loss t shape': (lambda: diffusion_loss(ZERO, X, X, S, torch.tensor([1]), X), 'one timestep per sample'),
    'loss bad model output': (lambda: diffusion_loss(lambda x, t, c: x[:, :, :4], X, X, S, torch.tensor([1, 2]), X),
                              'model_fn returned shape'),
    'loss reduction': (lambda: diffusion_loss(ZERO, X, X, S, torch.tensor([1, 2]), X, reduction='sum'), 'reduction'),
    'steps 0': (lambda: DDPMSampler().set_timesteps(0), 'num_inference_steps'),
    'steps > T': (lambda: DDPMSampler().set_timesteps(1001), 'num_inference_steps'),
    'steps float': (lambda: DDIMSampler().set_timesteps(2.5), 'num_inference_steps'),
    'step before set_timesteps': (lambda: DDPMSampler().step(X, 0, X), 'before set_timesteps'),
    'ddim step before set_timesteps': (lambda: DDIMSampler().step(X, 0, X), 'before set_timesteps'),
    'step t not in timesteps': (lambda: _ready(DDPMSampler()).step(X, 999, X), 'not one of'),
    'step t out of range': (lambda: _ready(DDPMSampler()).step(X, -20, X), 'not one of'),
    'step NaN x_t': (lambda: _ready(DDPMSampler()).step(X, 980, NAN), 'x_t contains NaN'),
    'step NaN eps': (lambda: _ready(DDIMSampler()).step(NAN, 980, X), 'model_output contains NaN'),
    'step shape': (lambda: _ready(DDPMSampler()).step(X[:1], 980, X), 'does not match'),
    'step noise and generator': (lambda: _ready(DDPMSampler()).step(X, 980, X, noise=X, generator=gen(0)), 'not both'),
    'step generators per sample': (lambda: _ready(DDPMSampler()).step(X, 980, X, generator=[gen(0)] * 3), 'one per sample'),
    'eta > 1': (lambda: DDIMSampler(eta=1.5), 'unknown eta'),
    'eta < 0': (lambda: DDIMSampler(eta=-0.5), 'unknown eta'),
    'restore seeds length': (lambda: restore(ZERO, X, DDPMSampler(), 5, seeds=[1]), 'one per sample'),
    'restore seeds type': (lambda: restore(ZERO, X, DDPMSampler(), 5, seeds=[1, 2.5]), 'seeds must be ints'),
    'restore seeds and generator': (lambda: restore(ZERO, X, DDPMSampler(), 5, seeds=[1, 2], generator=gen(0)), 'not both'),
    'restore empty batch': (lambda: restore(ZERO, X[:0], DDPMSampler(), 5, seeds=[]), 'empty batch'),
    'restore NaN cond': (lambda: restore(ZERO, NAN, DDPMSampler(), 5), 'cond contains NaN'),
    'restore steps': (lambda: restore(ZERO, X, DDPMSampler(), 0), 'num_inference_steps'),
    'restore bad sampler': (lambda: restore(ZERO, X, DDPMScheduler(), 5), 'sampler must be'),
    'offset noise generators': (lambda: offset_noise(X, generator=[gen(0)]), 'one per sample'),
    'offset negative': (lambda: offset_noise(X, offset=-0.1), 'offset'),
    'schedule betas': (lambda: NoiseSchedule(beta_start=0.1, beta_end=0.01), 'beta_start'),
}


@pytest.mark.parametrize('name', list(BAD))
def test_bad_input_raises_clear_value_error(name):
    fn, msg = BAD[name]
    with pytest.raises(ValueError, match=msg):
        fn()


# ----------------------------------------------------------------------------------------------- x0 and v objectives

@pytest.mark.parametrize('pt', ['sample', 'v_prediction'])
@pytest.mark.parametrize('kind', ['ddim', 'ddpm'])
def test_other_prediction_types_equal_diffusers_schedulers(pt, kind):
    """A network that outputs x0 or v, converted to ε for condiff's samplers, follows diffusers' scheduler of that
    prediction_type step by step (same x_prev and x̂0)."""
    ref = (DDIMScheduler if kind == 'ddim' else DDPMScheduler)(prediction_type=pt)
    s = DDIMSampler() if kind == 'ddim' else DDPMSampler()
    ref.set_timesteps(10); s.set_timesteps(10)
    g = gen(21)
    x0_target = torch.rand(SHAPE, generator=g) * 1.6 - 0.8
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    g_ref, g_ours = gen(6), gen(6)
    for t in ref.timesteps:
        tb = torch.full((SHAPE[0],), int(t))
        noise = torch.randn(SHAPE, generator=g)
        out = (x0_target + 0.05 * noise if pt == 'sample' else
               prediction_target(s.schedule, x0_target, (x_ref - s.schedule.alphas_cumprod[t].sqrt() * x0_target)
                                 / (1 - s.schedule.alphas_cumprod[t]).sqrt(), tb, pt) + 0.05 * noise)
        r = ref.step(out, t, x_ref, generator=g_ref)
        x_ours, x0 = s.step(eps_from_prediction(s.schedule, out, x_ours, tb, pt), int(t), x_ours, generator=g_ours, return_x0=True)
        assert maxdiff(x_ours, r.prev_sample) <= 2e-5 and maxdiff(x0, r.pred_original_sample) <= 2e-5
        x_ref = r.prev_sample


def test_velocity_target_equals_diffusers_get_velocity():
    ref, s, g = DDPMScheduler(), NoiseSchedule(), gen(8)
    x0, noise = torch.rand(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 300, 999])
    assert maxdiff(prediction_target(s, x0, noise, t, 'v_prediction'), ref.get_velocity(x0, noise, t)) <= 1e-6
    assert torch.equal(prediction_target(s, x0, noise, t, 'sample'), x0)
    assert torch.equal(prediction_target(s, x0, noise, t, 'epsilon'), noise)


@pytest.mark.parametrize('pt', PREDICTION_TYPES)
@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_loss_of_each_objective_equals_diffusers_training_example(pt, gamma):
    """diffusers' examples/text_to_image/train_text_to_image.py: target = noise | latents | get_velocity, Min-SNR weight
    min(snr, γ) divided by snr (ε), by snr + 1 (v), or left as is (x0)."""
    ref, s, g = DDPMScheduler(prediction_type=pt), NoiseSchedule(), gen(5)
    x0 = torch.rand(6, 1, 16, 16, generator=g)
    cond, noise = x0.flip(-1), offset_noise(x0, generator=g)
    t = torch.tensor([0, 5, 100, 258, 600, 999])
    noisy = ref.add_noise(x0, noise, t)
    pred = _toy_model(noisy, t, cond)
    target = {'epsilon': noise, 'sample': x0, 'v_prediction': ref.get_velocity(x0, noise, t)}[pt]
    snr = compute_snr(ref, t)
    w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = {'epsilon': w / snr, 'sample': w, 'v_prediction': w / (snr + 1)}[pt]
    loss = (F.mse_loss(pred.float(), target.float(), reduction='none').mean(dim=(1, 2, 3)) * w)
    got = diffusion_loss(_toy_model, x0, cond, s, t, noise, snr_gamma=gamma, reduction='none', prediction_type=pt)
    assert maxdiff(got, loss) <= 1e-6 * max(1.0, loss.abs().max().item())


# ----------------------------------------------------------------------------------------------- host syncs (issue 15)

def test_schedule_table_is_cached_and_exact():
    s = NoiseSchedule()
    a = s.table('cpu'); assert a is s.table(torch.device('cpu')) and torch.equal(a, s.alphas_cumprod)
    h = s.table('cpu', torch.float64); assert h is not a and torch.equal(h, s.alphas_cumprod.double())


def _no_checks(monkeypatch):
    "Make every validation helper of condiff.ddpm fail if called."
    import condiff.ddpm as D
    def boom(*a, **k): raise AssertionError('validation ran in the check=False path')
    monkeypatch.setattr(D, '_check_tensor', boom)
    monkeypatch.setattr(D.NoiseSchedule, 'check_timesteps', boom)


def test_unchecked_loss_equals_checked_and_validates_nothing(monkeypatch):
    x0, cond, noise = torch.randn(SHAPE, generator=gen(1)), torch.randn(SHAPE, generator=gen(2)), torch.randn(SHAPE, generator=gen(3))
    t = torch.tensor([0, 500, 999])
    fn = lambda x, tt, c: 0.5 * x + 0.1 * c  # noqa: E731
    ref = diffusion_loss(fn, x0, cond, S, t, noise, reduction='none')
    _no_checks(monkeypatch)
    got = diffusion_loss(fn, x0, cond, S, t, noise, reduction='none', check=False)
    assert torch.equal(ref, got)


def test_restore_validates_once_and_draws_the_same_noise(monkeypatch):
    import condiff.ddpm as D
    cond = torch.rand(3, 1, 8, 8, generator=gen(5))
    fn = lambda x, t, c: 0.3 * x - 0.2 * c  # noqa: E731
    for sampler in (DDPMSampler(), DDIMSampler(eta=0.5)):
        sampler.set_timesteps(10)
        # the old loop: the sampler draws the step noise itself, with every check
        gens = [gen(s) for s in (7, 8, 9)]
        x = D.randn_tensor(cond.shape, gens)
        for t in sampler.timesteps.tolist():
            x = sampler.step(fn(x, torch.full((3,), t), cond), t, x, generator=gens)
        calls = []
        real = D._check_tensor
        monkeypatch.setattr(D, '_check_tensor', lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
        got = restore(fn, cond, sampler, 10, seeds=[7, 8, 9])
        monkeypatch.undo()
        assert calls == ['cond'], calls  # once, before the loop; no per-step NaN scans
        assert torch.equal(got, x)


def test_restore_refuses_a_non_finite_result():
    with pytest.raises(ValueError, match='NaN or Inf'):
        restore(lambda x, t, c: torch.full_like(x, float('nan')), X, DDPMSampler(), 3, seeds=[0, 1])


def test_host_draw_equals_randn_tensor():
    from condiff.ddpm import _draw_host, randn_tensor
    for shape in ((3, 2, 16, 16), (2, 3, 5, 7)):
        g1, g2 = [gen(s) for s in range(shape[0])], [gen(s) for s in range(shape[0])]
        assert torch.equal(_draw_host(shape, g1), randn_tensor(shape, g2))
        assert torch.equal(_draw_host(shape, gen(4)), randn_tensor(shape, gen(4)))
