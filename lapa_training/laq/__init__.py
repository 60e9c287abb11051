"""LAQ, stage 1 of LAPA: a VQ-VAE that turns frame pairs (x_t, x_{t+H}) into discrete latent-action tokens."""

from lapa_training.laq.configuration_laq import LAQConfig
from lapa_training.laq.modeling_laq import LAQModel, LAQOutput, frames_to_input, output_to_uint8

__all__ = ["LAQConfig", "LAQModel", "LAQOutput", "frames_to_input", "output_to_uint8"]
