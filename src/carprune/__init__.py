"""carprune: structural compression of CNNs by classification accuracy reduction (CAR)."""

import importlib

from . import data as data
from . import models as models
from .car import Approximation as Approximation
from .car import Budget as Budget
from .car import EngineOptions as EngineOptions
from .car import GlobalProgress as GlobalProgress
from .car import GlobalStep as GlobalStep
from .car import LayerRecord as LayerRecord
from .car import PruneResult as PruneResult
from .car import Resume as Resume
from .car import Step as Step
from .car import car_prune as car_prune
from .car import global_car_prune as global_car_prune
from .classes import specialise as specialise
from .commands.prune import run as prune_run
from .config import PruneConfig as PruneConfig
from .criteria import CARImportance as CARImportance
from .criteria import criterion_prune as criterion_prune
from .errors import CarpruneError as CarpruneError
from .groups import Surgery as Surgery
from .groups import Unit as Unit
from .io import build as build
from .io import load as load
from .io import save as save
from .models import create_model as create_model
from .scoring import ScoringSet as ScoringSet
from .scoring.graph import inference as inference
from .train import Recipe as Recipe
from .train import evaluate as evaluate
from .train import fit as fit
from .units import Block as Block

__version__ = "0.1.0"

__all__ = [
    # pruning
    "car_prune", "global_car_prune", "criterion_prune", "prune_run", "CARImportance",
    "specialise",
    # their settings and records
    "Approximation", "Budget", "EngineOptions", "Resume", "PruneConfig",
    "PruneResult", "LayerRecord", "Step", "GlobalStep", "GlobalProgress",
    # interpretation
    "class_importance",
    # networks, units, data
    "Surgery", "Unit", "Block", "ScoringSet", "inference", "create_model", "load", "save",
    "build", "fit", "Recipe", "evaluate", "CarpruneError",
    # subpackages
    "data", "models", "interpret",
]


def __getattr__(name: str):
    """`interpret` and `class_importance` load on first use: they pull in matplotlib (PEP
    562)."""
    if name in ("interpret", "class_importance"):
        interpret = importlib.import_module(".interpret", __name__)
        return interpret if name == "interpret" else interpret.class_importance
    raise AttributeError(f"module 'carprune' has no attribute {name!r}")
