"""Supervised stages of the embedded default: tiny VAE, CLIP and InstructPix2Pix UNet."""
