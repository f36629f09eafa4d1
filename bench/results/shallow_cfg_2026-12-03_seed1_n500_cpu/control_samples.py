import json, sys, torch
from duodiff_fast.demo import load_demo_pair, timed_samples, score_modes
from duodiff_fast.sampling import DuoSampler
n, seed = 500, 1
shallow, deep = load_demo_pair("cpu")
gen = torch.Generator().manual_seed(seed)
noise = torch.randn(n, 3, 32, 32, generator=gen)
labels = torch.arange(n) % 10
prev = torch.load("sweep_seed1.json.images.pt")
images = {k: prev[k] for k in ("deep-only", "DuoDiff 0.4 s2", "DuoDiff 0.6 s2", "DuoDiff 0.4 s1.5")}
rows = [dict(mode=k, seconds_per_image=1.0) for k in images]
for name, s, w in (("deep 2 first 0.4", 0.4, 2.0), ("deep 2 first 0.6", 0.6, 2.0), ("deep 1.5 first 0.4", 0.4, 1.5)):
    smp = DuoSampler(deep, deep, schedule=deep.schedule_spec, solver="ddim", steps=25, switch=s, cfg_scale=3.0,
                     shallow_cfg_scale=w, clip_sample=1.0)
    images[name], sec = timed_samples(smp, noise, labels, 250)
    rows.append(dict(mode=name, seconds_per_image=sec / n)); print(name, sec, flush=True)
torch.save({k: images[k] for k in images if k.startswith("deep ")}, "control_seed1.images.pt")
score_modes(images, labels, rows, data=deep.training_data, seed=seed)
for r in rows:
    print(f"{r['mode']:22s} acc {100*r['class_acc']:.1f} [{100*r['class_acc_low']:.1f},{100*r['class_acc_high']:.1f}] "
          f"dacc {100*r.get('class_acc_diff_vs_deep', 0):+.1f} FID {r['proxy_fid']:.2f} [{r['proxy_fid_low']:.2f},{r['proxy_fid_high']:.2f}] "
          f"dFID {r.get('fid_diff_vs_deep', 0):+.2f} [{r.get('fid_diff_low', 0):+.2f},{r.get('fid_diff_high', 0):+.2f}]", flush=True)
