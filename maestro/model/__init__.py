"""The MAESTRO masked autoencoder: `build_model(cfg)`, `load_reference_state_dict(model, sd)`."""

from maestro.model.mae import MAESTRO, build_model
from maestro.model.output import ModelOutput
from maestro.model.reference import load_reference_state_dict

__all__ = ["MAESTRO", "ModelOutput", "build_model", "load_reference_state_dict"]
