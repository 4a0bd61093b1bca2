"""Weight import/export between Flax param trees and diffusers/transformers folders."""
