#!/usr/bin/env bash
# The shipped Fashion-MNIST models, with the project's own commands, in two lanes of one CPU thread each
# (issue 10). Files go to runs/ship/ and are copied to weights/ by hand once every run has finished,
# so a half-finished retraining never leaves weights/ with a prior paired to another VQ-VAE. The shipped
# files were then stored in float16, their metrics measured again (issue 20, in two lanes, about an hour):
#   .venv/bin/python -m training convert --dtype float16 --threads 1 weights/vqvae*.safetensors
#   .venv/bin/python -m training convert --dtype float16 --threads 1 weights/vae.safetensors weights/vae_context.safetensors ...
# and given out-of-distribution thresholds on the validation split (issue 25, 1-8 minutes a file on two threads):
#   .venv/bin/python -m training threshold --score webp --threads 2 weights/vae.safetensors weights/vae_conv.safetensors \
#     weights/vae_context.safetensors weights/vae_mlp_logistic.safetensors weights/vqvae_gated.safetensors \
#     weights/vqvae_pixelcnn.safetensors weights/vqvae_pixelcnnpp.safetensors
# Usage: bash training/fashion_mnist.sh vae | vq     (one lane; run both at once on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ship}
mkdir -p "$OUT"
t() { "$PY" -m training "$@" --threads 1 --quiet; }
case "${1:?lane: vae or vq}" in
  vae)
    t vae --arch mlp --likelihood bernoulli --epochs 15 --name vae_mlp --out "$OUT/vae_mlp.safetensors"
    t vae --arch mlp --likelihood logistic --epochs 15 --name vae_mlp_logistic --out "$OUT/vae_mlp_logistic.safetensors"
    t vae --arch conv --latent-dim 32 --fc-dim 512 --epochs 10 --name vae_conv --out "$OUT/vae_conv.safetensors"
    t vae --arch conv --latent-dim 32 --fc-dim 512 --decoder autoregressive --free-bits 0.5 --epochs 10 --name vae --out "$OUT/vae.safetensors"
    ;;
  vq)
    t vqvae --hidden-channels 64 --res-channels 32 --codebook-size 256 --embedding-dim 64 --epochs 10 --lr 5e-4 --name vqvae --out "$OUT/vqvae.safetensors"
    t prior --vqvae "$OUT/vqvae.safetensors" --arch pixelcnn --hidden-channels 64 --n-layers 8 --epochs 6 --batch-size 128 --name vqvae_pixelcnn --out "$OUT/vqvae_pixelcnn.safetensors"
    t prior --vqvae "$OUT/vqvae.safetensors" --arch gated --hidden-channels 64 --n-layers 5 --epochs 6 --batch-size 128 --name vqvae_gated --out "$OUT/vqvae_gated.safetensors"
    t prior --vqvae "$OUT/vqvae.safetensors" --arch pixelcnnpp --hidden-channels 48 --n-layers 1 --epochs 6 --batch-size 128 --name vqvae_pixelcnnpp --out "$OUT/vqvae_pixelcnnpp.safetensors"
    t vae --arch conv --latent-dim 32 --fc-dim 512 --decoder autoregressive --no-latent --epochs 10 --name vae_context --out "$OUT/vae_context.safetensors"
    ;;
  *) echo "lane must be vae or vq" >&2; exit 2 ;;
esac
