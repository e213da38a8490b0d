"""Lesion removal of MRI weights split by how far each lesion pixel is from its healthy value: where a base fails to remove.

Lesion removal (chapter 04) is 1 − mean|ŷ − x_healthy| / mean|y − x_healthy| over lesion pixels. This script restores
every slice of each phantom MRI test set (the `cpu` preset's test sets, as `make demo` builds them) with the weights
given, DDIM with 2 steps (the CPU default) unless `--sampler/--steps` say otherwise, seed 0, and splits the lesion
pixels by their input contrast c = |y − x_healthy| into bins. Per (weights, test set) it prints one JSON line for the
whole set (mean contrast, the fraction of lesion pixels darker than healthy, removal) and one per bin (its share of
the lesion pixels, its share of the input error, its removal), so one sees whether a set's low removal comes from
faint lesions or from lesions the model keeps whatever their contrast.

    .venv/bin/python bench/removal_by_contrast.py condiff/weights/base-mri.safetensors
"""
import argparse, json, os

BINS = (0.0, 0.03, 0.08, 0.15, 0.3, 1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('weights', nargs='+', help='MRI weights files (.safetensors) of the `cpu` UNet, or run folders')
    p.add_argument('--testsets', default='phantom-brats-t1,phantom-brats-t2,phantom-atlas', help='comma-separated MRI test sets')
    p.add_argument('--sampler', default='ddim', help="'ddim' or 'ddpm'")
    p.add_argument('--steps', type=int, default=2, help='sampling steps')
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import numpy as np, torch
    torch.set_num_threads(1)
    from condiff.unet import build_unet
    from condiff.train import init_from_weights
    from condiff.pipeline import load_testset
    from condiff.data import to_model_space, from_model_space
    from condiff.inference import restore_dataset, slice_seeds
    for w in a.weights:
        m = build_unet('cpu', 1); init_from_weights(m, w); m.eval()
        for s in a.testsets.split(','):
            ss = load_testset(s, preset='cpu')
            if ss.healthy is None: raise SystemExit(f"{s}: this test set has no healthy references; lesion removal needs them")
            y = to_model_space(torch.from_numpy(ss.images), ss.modality)
            r = restore_dataset(m, y, slice_seeds(0, ss.ids), a.sampler, a.steps, progress=False)
            r = np.clip(from_model_space(r.numpy(), ss.modality), 0, 1)
            les = ss.masks > 0.5
            signed = (ss.images - ss.healthy)[les].astype(np.float64)
            d_in, d_out = np.abs(signed), np.abs(r - ss.healthy)[les].astype(np.float64)
            base = dict(weights=str(w), testset=s, sampler=a.sampler, steps=a.steps)
            print(json.dumps(dict(base, bin='all', n_lesion_px=int(les.sum()), mean_contrast=round(d_in.mean(), 4),
                                  frac_darker=round(float((signed < 0).mean()), 3),
                                  lesion_removal=round(1 - d_out.mean() / d_in.mean(), 3))), flush=True)
            for lo, hi in zip(BINS[:-1], BINS[1:]):
                sel = (d_in >= lo) & (d_in < hi) if hi < BINS[-1] else d_in >= lo
                if not sel.any(): continue
                print(json.dumps(dict(base, bin=f'[{lo}, {hi})', frac_px=round(float(sel.mean()), 3),
                                      frac_error=round(d_in[sel].sum() / d_in.sum(), 3),
                                      lesion_removal=round(1 - d_out[sel].mean() / d_in[sel].mean(), 3))), flush=True)


if __name__ == '__main__':
    main()
