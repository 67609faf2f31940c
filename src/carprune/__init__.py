"""carprune: structural compression of CNNs by classification accuracy reduction (CAR)."""

from . import data as data
from . import models as models
from .commands.prune import run as prune_run  # noqa: F401  (the prune command, from Python)
from .config import PruneConfig as PruneConfig
from .criteria import CARImportance as CARImportance
from .errors import CarpruneError as CarpruneError
from .io import build as build
from .io import load as load
from .io import save as save
from .models import create_model as create_model
from .prune import car_prune as car_prune
from .prune import global_car_prune as global_car_prune
from .train import evaluate as evaluate
from .train import fit as fit

__version__ = "0.1.0"


def __getattr__(name: str):
    """`class_importance` loads on first use: it pulls in matplotlib (PEP 562)."""
    if name == "class_importance":
        from .interpret import class_importance

        return class_importance
    raise AttributeError(f"module 'carprune' has no attribute {name!r}")
