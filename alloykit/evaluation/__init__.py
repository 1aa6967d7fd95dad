"""Evaluation: tasks with train/validation/test splits, metrics, honest hyperparameter selection,
a harness that runs every registered merge method, and reports with plots."""

from alloykit.evaluation.metrics import accuracy, normalized
from alloykit.evaluation.search import Scored, SearchResult, Trial, golden_section, select
from alloykit.evaluation.tasks import SealedSplitError, Split, Task, make_splits

__all__ = [
    "Scored",
    "SearchResult",
    "Split",
    "Task",
    "SealedSplitError",
    "Trial",
    "accuracy",
    "golden_section",
    "make_splits",
    "normalized",
    "select",
]
