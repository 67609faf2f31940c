"""carprune: structural compression of CNNs by classification accuracy reduction (CAR)."""

from . import data as data
from . import models as models
from .errors import CarpruneError as CarpruneError
from .io import build as build
from .io import load as load
from .io import save as save
from .models import create_model as create_model
from .train import evaluate as evaluate
from .train import fit as fit

__version__ = "0.1.0"
