"""autodfp: automatic data-free structured pruning of pretrained CNNs.

::

    import autodfp
    model = autodfp.create_model("resnet20_cifar10")      # or any nn.Module of yours
    result = autodfp.prune(model, input_shape=(3, 32, 32), macs_ratio=0.5)
    autodfp.save(result, "runs/r20")

Data flow, one package per stage: models → analysis (graph, BN folding, similarity) → synth
(data-free inputs) → compress (plan, criteria, reconstruction, refinement, surgery) → search
(budget, env, rewards, SAC) → eval (metrics, bench, export). :mod:`autodfp.api` runs the pipeline;
:class:`autodfp.Config` holds every default.
"""

import os as _os

# OpenMP's default spin-waiting makes small CPU ops ~100x slower whenever another process shares
# the cores (measured: ResNet-56 batch-1 forward 2.6 s → 17 ms). Respect a user's own setting; it
# only takes effect if torch has not been imported yet.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from autodfp._version import __version__
from autodfp.api import PruningResult, create_model, evaluate, groups, load, plan_work, prune, save
from autodfp.compress.criteria import register_criterion
from autodfp.compress.plan import Plan
from autodfp.compress.reconstruct import register_strategy
from autodfp.config import Config
from autodfp.errors import AutoDFPError
from autodfp.models import ModelConfig, Preprocessing, get_config, list_models, load_model

__all__ = [
    "AutoDFPError",
    "Config",
    "ModelConfig",
    "Plan",
    "Preprocessing",
    "PruningResult",
    "__version__",
    "create_model",
    "evaluate",
    "get_config",
    "groups",
    "list_models",
    "load",
    "load_model",
    "plan_work",
    "prune",
    "register_criterion",
    "register_strategy",
    "save",
]
