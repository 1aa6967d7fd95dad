"""Planning and streaming a merge. Knows nothing of any particular method."""

from alloykit.engine.plan import MergePlan, MergeSpec, TensorJob, plan_merge
from alloykit.engine.run import DictSink, MergeReport, run_plan

__all__ = [
    "DictSink",
    "MergePlan",
    "MergeReport",
    "MergeSpec",
    "TensorJob",
    "plan_merge",
    "run_plan",
]
