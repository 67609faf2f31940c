"""The CAR loops: greedy CAR per layer (greedy.py) and global CAR under a budget
(global_car.py), the settings they take (settings.py) and the records they return
(records.py)."""

from .global_car import global_car_prune as global_car_prune
from .greedy import car_prune as car_prune
from .records import GlobalProgress as GlobalProgress
from .records import GlobalStep as GlobalStep
from .records import LayerRecord as LayerRecord
from .records import PruneResult as PruneResult
from .records import Step as Step
from .run import check_layers as check_layers
from .settings import Approximation as Approximation
from .settings import Budget as Budget
from .settings import EngineOptions as EngineOptions
from .settings import Resume as Resume
from .settings import resolve_keep as resolve_keep
