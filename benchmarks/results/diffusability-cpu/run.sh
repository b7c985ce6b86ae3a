#!/bin/bash
# Issue 26, must-show 2: one base VAE, two equal fine-tunes (alpha 0 and 0.5), eval, latent diffusion x 2 seeds.
# A record of what ran at the time: benchmarks/latent_diffusion_cifar10.py is gone since (git show 994e818:benchmarks/latent_diffusion_cifar10.py); its successor is benchmarks/diffusion_probe.py.
set -e
export LPIPS_WEIGHTS=/work/shared/weights/lpips PYTHONWARNINGS=ignore
E=/work/exp26; C=/work/shared/data/cifar10
cd /work/main
echo "start $(date -u +%T)"
python -m train --config cifar10-f4 --train_data_dir $C --output_dir $E/base --report_to none --validate_at_start false > $E/base.log 2>&1
echo "base done $(date -u +%T)"
for a in 0 0.5; do
  python -m train --config cifar10-f4 --train_data_dir $C --output_dir $E/ft-$a --report_to none \
    --pretrained_model_name_or_path $E/base/vae --max_train_steps 150 --lr_warmup_steps 0 --learning_rate 1e-4 \
    --equivariance_weight $a --checkpointing_steps 0 --validation_steps 0 --validate_at_start false --log_every 10 > $E/ft-$a.log 2>&1
  echo "ft-$a done $(date -u +%T)"
done
python -m eval --model $E/ft-0/vae --model $E/ft-0.5/vae --train_data_dir $C --resolution 32 --num_images 1000 \
  --no_fid --no_tiling_check --output_dir $E/eval > $E/eval.log 2>&1
echo "eval done $(date -u +%T)"
for a in 0 0.5; do for seed in 0 1; do
  python benchmarks/latent_diffusion_cifar10.py --vae $E/ft-$a/vae --cifar_dir $C --num_train_images 10000 \
    --train_minutes 3 --num_fd_images 250 --sampling_steps 25 --seed $seed --output_dir $E/ldm-$a-s$seed > $E/ldm-$a-s$seed.log 2>&1
  echo "ldm-$a-s$seed done $(date -u +%T)"
done; done
echo "all done $(date -u +%T)"
