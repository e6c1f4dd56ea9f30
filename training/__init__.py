"""Offline training: python -m training {vae,vqvae,prior,card,convert}. Writes safetensors weight files
(card: their model card, weights/README.md; convert: stores them in another dtype)."""
