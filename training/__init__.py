"""Offline training: python -m training {vae,vqvae,prior}. Writes safetensors weight files."""
