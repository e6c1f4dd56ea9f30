#!/usr/bin/env bash
# The shipped CIFAR-10 colour models (issue 11), with the project's own commands, in lanes of one CPU
# thread each. DATA is a folder laid out as {train,test}/{class}/*.jpg (for example the JPEG copy,
# extracted); `--data cifar10 --data-root R` reads the original data through torchvision instead.
# Files go to runs/ship/ and are copied to weights/ by hand once every run has finished.
# Usage: DATA=data/cifar10 bash training/cifar10.sh vq | priors | vae | tutorial
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ship}
DATA=${DATA:-data/cifar10}
mkdir -p "$OUT"
t() { "$PY" -m training "$@" --data "$DATA" --threads 1 --quiet; }
VQ="$OUT/vqvae_cifar10.safetensors"
case "${1:?lane: vq, priors, vae or tutorial}" in
  vq)
    t vqvae --hidden-channels 128 --res-channels 64 --codebook-size 512 --embedding-dim 64 --likelihood logistic \
      --mean-mse-weight 10 --epochs 9 --lr 5e-4 --name vqvae_cifar10 --out "$VQ" --run-dir runs/vqvae_cifar10
    ;;
  vae)
    t vae --arch conv --conv-channels 64 128 --latent-dim 128 --fc-dim 256 --likelihood logistic \
      --mean-mse-weight 10 --epochs 8 --iwae-k 50 --name vae_cifar10 --out "$OUT/vae_cifar10.safetensors" --run-dir runs/vae_cifar10
    ;;
  *) echo "lane must be vq, priors, vae or tutorial" >&2; exit 2 ;;
esac
