"""autodfp: automatic data-free structured pruning of pretrained CNNs.

Data flow: model → graph → similarity → plan (agent) → reconstruct → prune → evaluate/export.
"""
from .errors import AutoDFPError
from .models import ModelConfig, get_config, list_models, load_model

__version__ = "0.1.0"
__all__ = ["AutoDFPError", "ModelConfig", "get_config", "list_models", "load_model", "__version__"]
