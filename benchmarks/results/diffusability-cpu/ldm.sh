#!/bin/bash
# Issue 26, must-show 2 (second half): latent diffusion on both fine-tuned latent spaces, 2 seeds each, alone on the machine.
# A record of what ran at the time: benchmarks/latent_diffusion_cifar10.py is gone since (git show 994e818:benchmarks/latent_diffusion_cifar10.py); its successor is benchmarks/diffusion_probe.py.
export LPIPS_WEIGHTS=/work/shared/weights/lpips PYTHONWARNINGS=ignore
E=/work/exp26; C=/work/shared/data/cifar10
cd /work/main
for seed in 0 1; do for a in 0 0.5; do
  python benchmarks/latent_diffusion_cifar10.py --vae $E/ft-$a/vae --cifar_dir $C --num_train_images 10000 \
    --train_minutes 3 --num_fd_images 250 --sampling_steps 25 --seed $seed --output_dir $E/ldm-$a-s$seed > $E/ldm-$a-s$seed.log 2>&1
  echo "ldm-$a-s$seed rc=$? $(date -u +%T)"
done; done
echo "all done $(date -u +%T)"
