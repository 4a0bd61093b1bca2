"""Flax (linen) implementations of the UNet, VAE and CLIP models, NHWC throughout."""
