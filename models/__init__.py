"""Model definitions and the weight-file format. Imports torch and safetensors only."""

from models.io import ModelInfo, WeightFileError, load_model, read_metadata, save_model
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig
from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE, VQVAEConfig, VectorQuantizer

__all__ = ["PixelCNN", "PixelCNNConfig", "GatedPixelCNN", "GatedPixelCNNConfig", "PixelCNNpp", "PixelCNNppConfig", "VAE", "VAEConfig", "VQVAE", "VQVAEConfig", "VectorQuantizer", "ModelInfo", "WeightFileError", "load_model", "read_metadata", "save_model"]
