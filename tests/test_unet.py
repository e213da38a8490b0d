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


def test_paper_preset_is_the_official_config():
    cfg = diffusers_config({'img_channels': 1, **UNET_PRESETS['paper']})
    for k, v in OFFICIAL.items():
        if k in cfg: assert cfg[k] == v, k
    assert cfg['add_attention'] and cfg['time_embedding_dim'] == 512


@pytest.mark.parametrize('preset, size', [('fast', 16), ('tiny', 32)])
def test_other_presets_match_diffusers_and_train(preset, size):
    torch.manual_seed(1)
    ours = build_unet(preset, 1)
    ref = randomize_(UNet2DModel(sample_size=size, **diffusers_config(ours.config)), seed=5).eval()
    load_diffusers_state_dict(ours, ref.state_dict()).eval()
    x, t = torch.randn(2, 2, size, size), torch.tensor([3, 700])
    with torch.no_grad():
        assert (ours.forward_concat(x, t) - ref(x, t).sample).abs().max().item() < 1e-4
        if preset == 'tiny':
            assert (ours.forward_concat(x, 421) - ref(x, 421).sample).abs().max().item() < 1e-4   # scalar t, broadcast by both
            assert torch.equal(ours(x[:, :1], t, x[:, 1:]), ours.forward_concat(x, t))            # [x_t, cond] concatenation
    ours.train()
    ours(x[:, :1], t, x[:, 1:]).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_fast_attention_only_at_low_resolution():
    with torch.device('meta'): m = build_unet('fast', 1)
    assert not m.down_blocks[0].attentions and not m.down_blocks[1].attentions
    assert not m.up_blocks[2].attentions and not m.up_blocks[3].attentions       # 64² and 128² up levels
    assert m.down_blocks[3].attentions and m.up_blocks[0].attentions and m.mid_block.attentions


def test_paper_attention_placement():
    with torch.device('meta'): m = build_unet('paper', 1)
    assert [len(b.attentions) for b in m.down_blocks] == [0, 2, 2, 2]
    assert [len(b.attentions) for b in m.up_blocks] == [0, 3, 3, 3]             # 16² none, 128² three
    assert len(m.mid_block.attentions) == 1 and m.mid_block.attentions[0].heads == 64
    pc = parameter_counts(m)
    assert [round(pc[f'up_blocks.{i}'] / 1e6, 2) for i in range(4)] == [24.66, 8.14, 7.16, 1.99]


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim, flip, shift in [(128, True, 0), (32, False, 1), (16, True, 1)]:
        assert torch.equal(timestep_embedding(t, dim, flip, shift), get_timestep_embedding(t, dim, flip, shift))


def test_deprecated_attention_names_load():
    torch.manual_seed(2)
    m = build_unet('tiny', 1)
    new = condiff_to_diffusers(m.state_dict())
    old_names = {'group_norm': 'group_norm', 'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items(): k = k.replace(f'.{a}.', f'.{b}.')
        old[k] = v
    assert any('.proj_attn.' in k for k in old)
    other = load_diffusers_state_dict(build_unet('tiny', 1), old)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), m.state_dict().values()))
    with pytest.raises(ValueError, match='old and new attention names'):
        diffusers_to_condiff({**old, **new})


def test_strict_loading_errors(tmp_path):
    m = build_unet('tiny', 1)
    sd = condiff_to_diffusers(m.state_dict())
    with pytest.raises(ValueError, match=r"missing 1 \(conv_out.bias\)"):
        load_diffusers_state_dict(m, {k: v for k, v in sd.items() if k != 'conv_out.bias'})
    with pytest.raises(ValueError, match=r"unexpected 1 \(class_embedding.weight\)"):
        load_diffusers_state_dict(m, {**sd, 'class_embedding.weight': torch.zeros(3)})
    with pytest.raises(ValueError, match='shapes differ.*conv_in.weight'):
        load_diffusers_state_dict(build_unet('tiny', 3), sd)
    with pytest.raises(ValueError, match=r"lacks its \['k'\]"):
        load_diffusers_state_dict(m, {k: v for k, v in sd.items() if '.to_k.' not in k})
    with pytest.raises(FileNotFoundError, match='no diffusers weights'):
        load_diffusers_state_dict(m, tmp_path / 'nope.safetensors')
    with pytest.raises(FileNotFoundError, match='no diffusion_pytorch_model'):
        load_diffusers_state_dict(m, tmp_path)


def test_load_from_diffusers_folder(tmp_path):
    torch.manual_seed(3)
    ref = randomize_(UNet2DModel(sample_size=32, **diffusers_config(build_unet('tiny', 1).config)), seed=3).eval()
    ref.save_pretrained(tmp_path / 'unet_ema')                               # as the official checkpoints store it
    ours = load_diffusers_state_dict(build_unet('tiny', 1), tmp_path / 'unet_ema').eval()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad(): assert (ours.forward_concat(x, 10) - ref(x, 10).sample).abs().max().item() < 1e-4
    torch.save(ref.state_dict(), tmp_path / 'w.bin')
    again = load_diffusers_state_dict(build_unet('tiny', 1), tmp_path / 'w.bin')
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_per_sample_independence():
    torch.manual_seed(4)
    m = randomize_(build_unet('tiny', 1), seed=4).eval()
    x, c, t = torch.randn(6, 1, 32, 32), torch.randn(6, 1, 32, 32), torch.randint(0, 1000, (6,))
    with torch.no_grad():
        full = m(x, t, c)
        alone = torch.cat([m(x[i:i + 1], t[i:i + 1], c[i:i + 1]) for i in range(6)])
        x2, c2 = x.clone(), c.clone()
        x2[1:] = 100 * torch.randn_like(x2[1:]); c2[1:] = 0                  # other samples changed wildly
        first = m(x2, t, c2)[0]
    assert (full - alone).abs().max().item() < 1e-5
    assert (first - full[0]).abs().max().item() < 1e-5


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(5)
    m = build_unet('tiny', 1).eval()
    x, c, t = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.tensor([5, 600])
    with torch.no_grad():
        ref = m(x, t, c)
        cl = torch.channels_last
        m_cl = build_unet('tiny', 1).eval().to(memory_format=cl)
        m_cl.load_state_dict(m.state_dict())
        out = m_cl(x.to(memory_format=cl), t, c.to(memory_format=cl))
        with torch.autocast('cpu', dtype=torch.bfloat16): half = m(x, t, c)
    assert (out - ref).abs().max().item() < 1e-5
    assert half.dtype == torch.bfloat16 and (half.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


class _MaxOutput(TorchDispatchMode):
    "Records the largest tensor any aten op produces."
    def __init__(self):
        super().__init__(); self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(o): self.max = max(self.max, o.numel())
        return out


def test_attention_never_materialises_the_score_matrix():
    att = Attention(64, head_dim=8, groups=32, eps=1e-5)
    x = torch.randn(1, 64, 48, 48, requires_grad=True)                        # N = 2304 tokens, 8 heads
    n = 48 * 48
    with _MaxOutput() as rec:
        att(x).sum().backward()
    assert rec.max < n * n                                                    # one head's N×N scores would be 5.3 M
    assert rec.max <= 3 * 64 * n                                              # nothing bigger than q, k, v together


def test_config_round_trip_json():
    m = build_unet('tiny', 3, layers_per_block=2)
    cfg = json.loads(json.dumps(m.config))
    again = build_unet_from_config(cfg)
    assert again.config == m.config and again.config['layers_per_block'] == 2
    assert [k for k in again.state_dict()] == [k for k in m.state_dict()]
    partial = {'preset': 'tiny', 'img_channels': 1}                             # fields from the named preset
    assert build_unet_from_config(partial).config == build_unet('tiny', 1).config
    with pytest.raises(ValueError, match="lacks field"):
        build_unet_from_config({'preset': 'custom', 'img_channels': 1})
    with pytest.raises(ValueError, match="lacks 'img_channels'"):
        build_unet_from_config({'preset': 'tiny'})


@pytest.mark.parametrize('call, match', [
    (lambda m, x, t, c: build_unet('huge', 1), 'unknown UNet preset'),
    (lambda m, x, t, c: build_unet('tiny', 0), 'img_channels must be an int >= 1'),
    (lambda m, x, t, c: build_unet('tiny', 1, down_attention=(True,)), 'one flag per level'),
    (lambda m, x, t, c: build_unet('tiny', 1, attention_head_dim=5), 'attention_head_dim=5'),
    (lambda m, x, t, c: m(x, t, c[:, :, :16]), "cond must have x_t's shape"),
    (lambda m, x, t, c: m(x, t, c.numpy()), "cond must be a torch tensor"),
    (lambda m, x, t, c: m(x[:, :, :, :20], t, c[:, :, :, :20]), r'divisible by 8'),
    (lambda m, x, t, c: m(x.repeat(1, 2, 1, 1), t, c.repeat(1, 2, 1, 1)), r'1 channel\(s\)'),
    (lambda m, x, t, c: m(x[0], t, c[0]), 'B×C×H×W'),
    (lambda m, x, t, c: m(x.long(), t, c.long()), 'floating point'),
    (lambda m, x, t, c: m(x, t[:1], c), r'shape \[B\] = \[2\]'),
    (lambda m, x, t, c: m(x, t[:, None], c), r'shape \[B\] = \[2\]'),
    (lambda m, x, t, c: m(x, t > 3, c), 'integer or real timesteps'),
    (lambda m, x, t, c: m.forward_concat(x, t), r'2 channel\(s\)'),
])
def test_bad_inputs(call, match):
    m = build_unet('tiny', 1)
    x, c, t = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=match):
        call(m, x, t, c)
