"""Interpretation: which classes need each filter, what excites it, colour and diversity
(`carprune explain`, in commands/explain.py, writes them as one report)."""

from .class_importance import ClassImportance as ClassImportance
from .class_importance import class_importance as class_importance
from .colour import activation_colour_index as activation_colour_index
from .colour import colour_selectivity as colour_selectivity
from .colour import diversity as diversity
from .colour import diversity_comparison as diversity_comparison
from .pictures import Patches as Patches
from .pictures import ReceptiveField as ReceptiveField
from .pictures import filter_grid as filter_grid
from .pictures import heatmap as heatmap
from .pictures import receptive_field as receptive_field
from .pictures import top_patches as top_patches
