"""The MAESTRO masked autoencoder: `build_model(cfg)`, `load_reference_state_dict(model, sd)`."""

from maestro.model.mae import MAESTRO, ModelOutput, build_model
from maestro.model.reference import load_reference_state_dict

__all__ = ["MAESTRO", "ModelOutput", "build_model", "load_reference_state_dict"]
