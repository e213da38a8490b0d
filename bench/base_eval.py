"""The base model alone on the phantom MRI test sets: AP_p, lesion removal and healthy fidelity of MRI weights files.

For every weights file given (the `cpu` UNet, e.g. the shipped `base-mri` and a checkpoint of a longer run), builds the
UNet, loads the weights (`condiff.train.init_from_weights`) and runs `condiff.inference.evaluate_fold` with the model in
hand on `--n` evenly spaced test slices of each set (both classes, `condiff.pipeline.subsample`), DDIM with 10 steps
unless `--sampler/--steps/--eta` say otherwise, seed 0. Prints one JSON line per (weights, test set); the Intensity control of the same slices is in bench/README.

    .venv/bin/python bench/base_eval.py condiff/weights/base-mri.safetensors runs/mriB/base-mri/cpu/fold0/checkpoints/latest/ema.safetensors
"""
import argparse, json, os, tempfile


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('weights', nargs='+', help='MRI weights files (.safetensors) of the `cpu` UNet')
    p.add_argument('--testsets', default='phantom-atlas,phantom-brats-t1,phantom-brats-t2', help='comma-separated MRI test sets')
    p.add_argument('--n', type=int, default=40, help='slices per test set (evenly spaced)')
    p.add_argument('--sampler', default='ddim', help="'ddim' or 'ddpm'")
    p.add_argument('--steps', type=int, default=10, help='sampling steps')
    p.add_argument('--eta', type=float, default=0.0, help="DDIM's eta")
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)
    from condiff.unet import build_unet
    from condiff.train import init_from_weights
    from condiff.pipeline import load_testset
    from condiff.inference import evaluate_fold
    sets = a.testsets.split(',')
    tss = {s: load_testset(s, preset='cpu', test_images=a.n) for s in sets}
    for w in a.weights:
        m = build_unet('cpu', 1); init_from_weights(m, w); m.eval()
        for s in sets:
            with tempfile.TemporaryDirectory() as d:
                r = evaluate_fold(m, tss[s], d, sampler=a.sampler, num_steps=a.steps, eta=a.eta, seed=0, progress=False)
            rq = r['restoration']
            print(json.dumps(dict(weights=w, testset=s, sampler=a.sampler, steps=a.steps, eta=a.eta, n=len(tss[s]), AP_p=round(r['AP_p'], 4), max_Dice=round(r['max_Dice'], 4),
                                  lesion_removal=round(rq['lesion_removal'], 3), healthy_fidelity=round(rq['healthy_fidelity'], 4))), flush=True)


if __name__ == '__main__':
    main()
