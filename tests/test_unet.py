"""Oracle tests for condiff.unet: diffusers' UNet2DModel, built here from the official configuration (method spec §1.1,
written out independently of condiff's presets), with seeded random weights loaded through `load_diffusers_state_dict`,
must give condiff's output; plus parameter counts, the other presets, batch independence and input errors."""
import json
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch.utils._python_dispatch import TorchDispatchMode

from condiff.unet import (UNET_PRESETS, Attention, ConditionalUNet, build_unet, build_unet_from_config,
                          condiff_to_diffusers, diffusers_config, diffusers_to_condiff, load_diffusers_state_dict,
                          parameter_counts, timestep_embedding)

# The `unet:` block of the official omega_config_big_split.yaml, as diffusers 0.24 reads it (spec §1.1).
OFFICIAL = dict(block_out_channels=(128, 256, 256, 512), layers_per_block=2,
                down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
                up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D'),
                attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn='silu', dropout=0.0,
                time_embedding_type='positional', flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                downsample_type='conv', upsample_type='conv', mid_block_scale_factor=1,
                resnet_time_scale_shift='default', center_input_sample=False, class_embed_type=None)

n_params = lambda m: sum(p.numel() for p in m.parameters())


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def randomize_(model, seed):
    "Seeded random weights for every parameter (norm scales around 1, everything else around 0), so no layer hides."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1: p.copy_((1.0 if 'norm' in name and name.endswith('weight') else 0.0) + 0.2 * noise)
            else: p.copy_(noise / (p[0].numel() ** 0.5))
    return model


@pytest.fixture(scope='module', params=[1, 3], ids=['MRI 2to1', 'RF 6to3'])
def official_pair(request):
    "An official-configuration diffusers UNet2DModel (random seeded weights) and condiff's paper UNet loaded from it."
    c = request.param
    torch.manual_seed(0)
    ref = randomize_(UNet2DModel(sample_size=32, in_channels=2 * c, out_channels=c, **OFFICIAL), seed=c).eval()
    ours = load_diffusers_state_dict(build_unet('paper', c), ref.state_dict()).eval()
    return c, ref, ours


def test_paper_parameter_counts(official_pair):
    c, ref, ours = official_pair
    want = {1: 72_410_241, 3: 72_417_155}[c]
    assert n_params(ref) == want and n_params(ours) == want


def test_paper_matches_diffusers(official_pair):
    c, ref, ours = official_pair
    g = torch.Generator().manual_seed(10 + c)
    x = torch.randn(2, 2 * c, 32, 32, generator=g)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        want = ref(x, t).sample
        got = ours.forward_concat(x, t)
    assert want.shape == (2, c, 32, 32) and want.abs().max() > 0.5       # a non-trivial output
    assert (got - want).abs().max().item() < 1e-4


def test_paper_weights_round_trip_to_diffusers(official_pair):
    c, ref, ours = official_pair
    back = condiff_to_diffusers(ours.state_dict())
    sd = ref.state_dict()
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


class _MaxOutput(TorchDispatchMode):
    "Records the largest tensor any aten op produces."
    def __init__(self):
        super().__init__(); self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(o): self.max = max(self.max, o.numel())
        return out


