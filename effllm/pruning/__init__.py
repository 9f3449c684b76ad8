"""Pruning-aware pretraining: minimal parameter groups, saliency, selection, surgery, weight update.

One module per concept (docs/method.md explains the algorithm):

- ``config``     PruningConfig, its defaults and why (quoted by the trainer's --help)
- ``groups``     the three group types and what each costs (GroupType, ModelShapes, enumerate_groups)
- ``ownership``  the one table of which rows/columns of which weights each group type owns
- ``saliency``   per-group EMAs of sum(g*w) and sum((g*w)^2), updated after every backward
- ``selection``  globally lowest saliency density, with floors
- ``surgery``    physical removal: weights, gradients, optimizer state, config
- ``obs``        optional local second-order weight update (OBS)
- ``schedule``   ParameterBudget: the parameter budget over tokens
- ``pruner``     Pruner: all of the above for one model, the prune log, state_dict for resume
- ``oneshot``    one_shot_prune: the LLM-Pruner-style baseline; calibrate: its calibration pass
"""

from .config import DEFAULTS_HELP, PruningConfig
from .groups import Group, GroupType, ModelShapes, enumerate_groups
from .oneshot import calibrate, one_shot_prune
from .pruner import Pruner
from .saliency import SaliencyTracker
from .schedule import ParameterBudget
from .selection import check_uniform, select_groups
from .surgery import Removal, apply_surgery

__all__ = [
    "DEFAULTS_HELP",
    "Group",
    "GroupType",
    "ParameterBudget",
    "ModelShapes",
    "Pruner",
    "PruningConfig",
    "Removal",
    "SaliencyTracker",
    "apply_surgery",
    "calibrate",
    "check_uniform",
    "enumerate_groups",
    "one_shot_prune",
    "select_groups",
]
