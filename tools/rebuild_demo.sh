#!/usr/bin/env bash
# Rebuild the shipped demo weights from nothing, in ./runs (the 2-core CPU machine; minutes per command in
# the README's 'Demo weights' section). The deep U-ViT in six sittings: two on shapes-bold (4,000 steps,
# then a warm restart stopped at 2,500 of a 3,500-step schedule), four on shapes-plain (4,000 steps, then
# warm restarts of 2,000 steps at 3e-4, 5,000 at 4e-4 and 5,000 at 3e-4); its separately trained 3-block
# companion, warm-started from the third sitting, in six sittings (1,500 + 3,000 + 6,000 steps on all
# timesteps, then 4,000 + 6,000 + 4,000 steps drawing 80% of its timesteps from the noisy 40-100% it
# samples at switches up to 0.6); early-exit heads of both published variants on the frozen final deep
# model; then the copy into duodiff_fast/assets.
set -euo pipefail
RECIPE="--batch-size 64 --weight-decay 0 --betas 0.9,0.999 --ema-decay 0.999 --min-snr-gamma 5 --ckpt-every 250"
duodiff-fast train --model uvit_shapes32_demo --data shapes-bold --steps 4000 --lr 1e-3 --warmup-steps 100 \
  --seed 0 $RECIPE --out runs/demo_deep
duodiff-fast train --model uvit_shapes32_demo --data shapes-bold --steps 3500 --stop-at 2500 --lr 5e-4 \
  --warmup-steps 50 --seed 1 $RECIPE --init-from-deep runs/demo_deep/ema.safetensors --out runs/demo_deep2
duodiff-fast train --model uvit_shapes32_demo --data shapes-plain --steps 4000 --lr 5e-4 --warmup-steps 50 \
  --seed 2 $RECIPE --init-from-deep runs/demo_deep2/ema.safetensors --out runs/demo_deep3
duodiff-fast train --model uvit_shapes32_demo --data shapes-plain --steps 2000 --lr 3e-4 --warmup-steps 50 \
  --seed 3 $RECIPE --init-from-deep runs/demo_deep3/ema.safetensors --out runs/demo_deep4
duodiff-fast train --model uvit_shapes32_demo --data shapes-plain --steps 5000 --lr 4e-4 --warmup-steps 50 \
  --seed 7 $RECIPE --init-from-deep runs/demo_deep4/ema.safetensors --out runs/demo_deep5
duodiff-fast train --model uvit_shapes32_demo --data shapes-plain --steps 5000 --lr 3e-4 --warmup-steps 50 \
  --seed 8 $RECIPE --init-from-deep runs/demo_deep5/ema.safetensors --out runs/demo_deep6
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 1500 --lr 1e-3 \
  --warmup-steps 50 --seed 0 $RECIPE --init-from-deep runs/demo_deep3/ema.safetensors --out runs/demo_shallow
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 3000 --lr 5e-4 \
  --warmup-steps 50 --seed 4 $RECIPE --init-from-deep runs/demo_shallow/ema.safetensors --out runs/demo_shallow2
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 6000 --lr 4e-4 \
  --warmup-steps 50 --seed 5 $RECIPE --init-from-deep runs/demo_shallow2/ema.safetensors --out runs/demo_shallow3
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 4000 --lr 3e-4 \
  --warmup-steps 50 --seed 6 --t-range 0.4,1.0,0.8 $RECIPE --init-from-deep runs/demo_shallow3/ema.safetensors \
  --out runs/demo_shallow4
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 6000 --lr 3e-4 \
  --warmup-steps 50 --seed 9 --t-range 0.4,1.0,0.8 $RECIPE --init-from-deep runs/demo_shallow4/ema.safetensors \
  --out runs/demo_shallow5
duodiff-fast train --model uvit_shapes32_demo_shallow --data shapes-plain --steps 4000 --lr 3e-4 \
  --warmup-steps 50 --seed 10 --t-range 0.4,1.0,0.8 $RECIPE --init-from-deep runs/demo_shallow5/ema.safetensors \
  --out runs/demo_shallow6
for v in adadiff duodiff; do
  duodiff-fast train-exits --backbone runs/demo_deep6/model.json --backbone-ckpt runs/demo_deep6/ema.safetensors \
    --data shapes-plain --variant $v --steps $([ $v = adadiff ] && echo 1000 || echo 600) --out runs/demo_exits_$v
done
python tools/export_demo.py --deep runs/demo_deep6/ema.safetensors --shallow runs/demo_shallow6/ema.safetensors \
  --exits-adadiff runs/demo_exits_adadiff/exits.safetensors --exits-duodiff runs/demo_exits_duodiff/exits.safetensors
