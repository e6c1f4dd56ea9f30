#!/usr/bin/env bash
# The shipped CIFAR-10 colour models (issue 11), with the project's own commands, in lanes of one CPU
# thread each. DATA is a folder laid out as {train,test}/{class}/*.jpg (for example the JPEG copy,
# extracted); `--data cifar10 --data-root R` reads the original data through torchvision instead.
# Files go to runs/ship/; the `ship` lane copies them (and small GIFs) to weights/ once every run has finished.
# Usage: DATA=data/cifar10 bash training/cifar10.sh vq | vae   (two lanes at once), then prior-a | prior-b (two
# lanes, once vq has finished), then ship; the colour PixelVAE (issue 25) on its own: pixelvae
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ship}
DATA=${DATA:-data/cifar10}
mkdir -p "$OUT"
t() { local family=$1; shift; "$PY" -m training "$family" --data "$DATA" --threads 1 --quiet "$@"; }  # later flags win
VQ="$OUT/vqvae_cifar10.safetensors"
# every prior: the same epochs and schedule (PRIOR_EPOCHS to change them), class-conditional on the folder's labels
PRIOR_ARGS=(--epochs "${PRIOR_EPOCHS:-7}" --batch-size 128 --lr 1e-3 --lr-schedule cosine --min-lr 1e-5)
case "${1:?lane: vq, vae, prior-a, prior-b, ship or pixelvae}" in
  vq)  # as the shipped file was trained: 7 epochs at a constant rate (one thread, beside the vae lane), then alone on
       # two threads with the cosine schedule, lengthened twice (--stop-after replays where each curve was left);
       # from epoch 17 the mean image's squared error weighs 100, not 10, and picks the best epoch, because the
       # PSNR had stalled at 21.5 dB. Each epoch's learning rate is in the checkpoint's history.
    VQ_ARGS=(--hidden-channels 128 --res-channels 64 --codebook-size 512 --embedding-dim 64 --likelihood logistic
      --lr 5e-4 --name vqvae_cifar10 --out "$VQ" --run-dir runs/vqvae_cifar10)
    COSINE=(--lr-schedule cosine --min-lr 1e-5 --resume --threads 2)
    t vqvae "${VQ_ARGS[@]}" --mean-mse-weight 10 --epochs 7
    t vqvae "${VQ_ARGS[@]}" --mean-mse-weight 10 --epochs 18 --stop-after 8 "${COSINE[@]}"
    t vqvae "${VQ_ARGS[@]}" --mean-mse-weight 10 --epochs 22 --stop-after 16 "${COSINE[@]}"
    t vqvae "${VQ_ARGS[@]}" --mean-mse-weight 100 --select-by mse --epochs 24 "${COSINE[@]}"
    ;;
  vae)
    t vae --arch conv --conv-channels 64 128 --latent-dim 128 --fc-dim 256 --likelihood logistic \
      --mean-mse-weight 10 --epochs 8 --iwae-k 50 --name vae_cifar10 --out "$OUT/vae_cifar10.safetensors" --run-dir runs/vae_cifar10
    ;;
  prior-a)  # after vq: the Gated PixelCNN, the PixelCNN, then the smaller PixelCNN the card compares with (not shipped)
    t prior --vqvae "$VQ" --arch gated --hidden-channels 64 --n-layers 5 "${PRIOR_ARGS[@]}" \
      --name vqvae_cifar10_gated --out "$OUT/vqvae_cifar10_gated.safetensors" --run-dir runs/vqvae_cifar10_gated
    t prior --vqvae "$VQ" --arch pixelcnn --hidden-channels 64 --n-layers 8 "${PRIOR_ARGS[@]}" \
      --name vqvae_cifar10_pixelcnn --out "$OUT/vqvae_cifar10_pixelcnn.safetensors" --run-dir runs/vqvae_cifar10_pixelcnn
    t prior --vqvae "$VQ" --arch pixelcnn --hidden-channels 32 --n-layers 4 "${PRIOR_ARGS[@]}" \
      --name pixelcnn_small --out runs/tutorial/pixelcnn_small.safetensors --run-dir runs/tutorial/run
    ;;
  prior-b)  # after vq: PixelCNN++
    t prior --vqvae "$VQ" --arch pixelcnnpp --hidden-channels 48 --n-layers 1 "${PRIOR_ARGS[@]}" \
      --name vqvae_cifar10_pixelcnnpp --out "$OUT/vqvae_cifar10_pixelcnnpp.safetensors" --run-dir runs/vqvae_cifar10_pixelcnnpp
    ;;
  ship)  # every run finished: the weight files into weights/, small GIFs (first row of each grid) into weights/samples/
    for m in vqvae_cifar10 vqvae_cifar10_gated vqvae_cifar10_pixelcnn vqvae_cifar10_pixelcnnpp vae_cifar10; do
      cp "$OUT/$m.safetensors" weights/
    done
    # stored in float16, every metric measured again on the stored weights (issue 20; about 35 minutes on one thread)
    "$PY" -m training convert --dtype float16 --threads 1 weights/vqvae_cifar10.safetensors weights/vqvae_cifar10_gated.safetensors \
      weights/vqvae_cifar10_pixelcnn.safetensors weights/vqvae_cifar10_pixelcnnpp.safetensors weights/vae_cifar10.safetensors
    # out-of-distribution thresholds on the validation split (issue 25; 3 minutes a prior, 18 for the VAE, two threads)
    "$PY" -m training threshold --score webp --threads 2 weights/vqvae_cifar10_gated.safetensors \
      weights/vqvae_cifar10_pixelcnn.safetensors weights/vqvae_cifar10_pixelcnnpp.safetensors weights/vae_cifar10.safetensors
    "$PY" - <<'PY'
from training.visuals import small_gif
for run, names in {"vqvae_cifar10": ("inputs", "reconstructions"), "vae_cifar10": ("reconstructions", "samples"),
                   "vqvae_cifar10_gated": ("samples",), "vqvae_cifar10_pixelcnn": ("samples",),
                   "vqvae_cifar10_pixelcnnpp": ("samples",)}.items():
    for name in names:
        print(small_gif(f"runs/{run}", name, f"weights/samples/{run}__{name}.gif", rows=1, max_frames=12))
# the smaller PixelCNN's per-class grid, drawn as the card draws the shipped priors' (same seed and layout)
from models.io import load_model
from training.card import sample_grid
from training.visuals import grid_image
# and the best prior's at temperature 0.7 (/sample's temperature=0.7), beside the card's at 1
vqvae, _ = load_model("weights/vqvae_cifar10.safetensors")
for prior_file, temperature, out in (("runs/tutorial/pixelcnn_small.safetensors", 1.0, "comparison_small_pixelcnn.png"),
                                     ("weights/vqvae_cifar10_pixelcnnpp.safetensors", 0.7, "vqvae_cifar10_pixelcnnpp_t0.7.png")):
    prior, info = load_model(prior_file)
    images, nrow = sample_grid(prior, info, {info.extra["vqvae"]: vqvae}, seed=0, temperature=temperature)
    grid_image(images, nrow=nrow).save(f"weights/samples/{out}")
    print(f"weights/samples/{out}")
PY
    ;;
  pixelvae)  # issue 25: the colour PixelVAE (an autoregressive decoder), alone on two threads; then into weights/ in
    # float16 with every metric measured again, and the out-of-distribution threshold on its validation split
    "$PY" -m training vae --data "$DATA" --threads 2 --arch conv --conv-channels 32 64 --latent-dim 64 --fc-dim 256 \
      --decoder autoregressive --ar-channels 64 --ar-layers 3 --free-bits 0.5 --batch-size 64 --lr 1e-3 \
      --lr-schedule cosine --min-lr 1e-5 --epochs 14 --iwae-k 50 --psnr-images 500 --name vae_cifar10_ar \
      --out "$OUT/vae_cifar10_ar.safetensors" --run-dir runs/vae_cifar10_ar
    cp "$OUT/vae_cifar10_ar.safetensors" weights/
    "$PY" -m training convert --dtype float16 --threads 2 weights/vae_cifar10_ar.safetensors
    "$PY" -m training threshold --score webp --threads 2 weights/vae_cifar10_ar.safetensors
    ;;
  *) echo "lane must be vq, vae, prior-a, prior-b, ship or pixelvae" >&2; exit 2 ;;
esac
