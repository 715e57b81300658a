"""autodfp: automatic data-free structured pruning of pretrained CNNs.

Data flow: model → graph → similarity → plan (agent) → reconstruct → prune → evaluate/export.
"""
import os as _os

# OpenMP's default spin-waiting makes small CPU ops ~100x slower whenever another process shares
# the cores (measured: ResNet-56 batch-1 forward 2.6 s → 17 ms). Respect a user's own setting; it
# only takes effect if torch has not been imported yet.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from autodfp.errors import AutoDFPError  # noqa: E402
from autodfp.models import ModelConfig, get_config, list_models, load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AutoDFPError", "ModelConfig", "get_config", "list_models", "load_model", "__version__"]
