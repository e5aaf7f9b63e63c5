"""Tools for real models: insert, fold, recalibrate, convert and diagnose batch normalization.

Every tool works on any ``torch.nn.Module``, with ``torch.nn.BatchNorm*`` layers as well as ours.
``insert``, ``fold`` and ``convert`` return new models; ``recalibrate`` writes the running
statistics in place; ``diagnose`` only reads.
"""

from .convert import convert
from .diagnose import Diagnosis, LayerDiagnosis, diagnose
from .fold import FoldReport, fold
from .insert import insert
from .recalibrate import Recalibration, recalibrate

__all__ = [
    "Diagnosis",
    "FoldReport",
    "LayerDiagnosis",
    "Recalibration",
    "convert",
    "diagnose",
    "fold",
    "insert",
    "recalibrate",
]
