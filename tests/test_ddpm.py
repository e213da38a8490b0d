"""condiff.ddpm checks a notebook cannot run well: GPU against CPU, and (by monkeypatching) that the unchecked paths
validate nothing. The diffusers oracles are test cells under their definitions in nbs/00_ddpm.ipynb."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from condiff.ddpm import DDIMSampler, DDPMSampler, NoiseSchedule, diffusion_loss, min_snr_weight, offset_noise, q_sample, restore

SHAPE = (3, 2, 12, 12)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- schedule


# ----------------------------------------------------------------------------------------------- DDPM sampler

def _eps_model(kind, x, t, sched, x0_target, g):
    "Model outputs for the oracle runs: pure random ε̂, or a near-ideal ε̂ so that x̂0 is mostly not clipped."
    if kind == 'random':
        return torch.randn(x.shape, generator=g)
    ab = sched.alphas_cumprod[t]
    return (x - ab.sqrt() * x0_target) / (1 - ab).sqrt() + 0.3 * torch.randn(x.shape, generator=g)


# ----------------------------------------------------------------------------------------------- DDIM sampler


# ----------------------------------------------------------------------------------------------- forward process


# ----------------------------------------------------------------------------------------------- Min-SNR and loss


def _toy_model(x_t, t, cond):
    return torch.tanh(x_t * 0.7 + cond) * (t.float() / 1000).view(-1, 1, 1, 1) - 0.1 * cond


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


# ----------------------------------------------------------------------------------------------- x0 and v objectives


# ----------------------------------------------------------------------------------------------- host syncs (issue 15)


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


