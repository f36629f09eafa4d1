import torch
from duodiff_fast.demo import load_demo_pair, score_modes
n, seed = 500, 1
shallow, deep = load_demo_pair("cpu")
labels = torch.arange(n) % 10
a = torch.load("sweep_seed1.json.images.pt"); b = torch.load("control_seed1.images.pt")
for duo, ctl in (("DuoDiff 0.4 s2", "deep 2 first 0.4"), ("DuoDiff 0.6 s2", "deep 2 first 0.6"), ("DuoDiff 0.4 s1.5", "deep 1.5 first 0.4")):
    images = {ctl: b[ctl], duo: a[duo]}
    rows = [dict(mode=ctl, seconds_per_image=1.0), dict(mode=duo, seconds_per_image=1.0)]
    score_modes(images, labels, rows, data=deep.training_data, seed=seed, baseline=ctl)
    r = rows[1]
    print(f"{duo} vs {ctl}: dacc {100*r['class_acc_diff_vs_deep']:+.1f} [{100*r['class_acc_diff_low']:+.1f},{100*r['class_acc_diff_high']:+.1f}] "
          f"dFID {r['fid_diff_vs_deep']:+.2f} [{r['fid_diff_low']:+.2f},{r['fid_diff_high']:+.2f}]", flush=True)
