"""Parameters shared by the zip and MuDSC methods (declared once, documented once)."""

from __future__ import annotations

from alloykit.methods.base import Param


def zip_params(a: float, b: float) -> list[Param]:
    return [
        Param(
            "zip_a", float, a, ge=0.0, le=1.0, help="ZipIt's α: similarity decay of a merged node (≤ 0: ban)"
        ),
        Param("zip_b", float, b, ge=0.0, le=1.0, help="ZipIt's β: share of merges allowed inside one model"),
        Param(
            "width",
            float,
            1.0,
            gt=0.0,
            help="merged width as a multiple of the original (1: the original; MuDSC's r = 0.5 with N "
            "models is N/2)",
        ),
        Param(
            "strict_budget",
            bool,
            False,
            help="ban in-model merges as soon as the budget is 0 (the reference allows one more)",
        ),
        Param(
            "colsum_eps",
            float,
            1e-5,
            ge=0.0,
            help="added to each merged unit's member count, as the reference code (0: exact means)",
        ),
    ]


SWEEPS = [
    Param(
        "similarity", str, "pearson", choices=("pearson", "cosine", "inner"), help="weight-space similarity"
    ),
    Param("max_sweeps", int, 100, ge=1, help="sweeps over the groups at most"),
    Param("patience", int, 5, ge=1, help="sweeps without a better mean score before stopping"),
    Param("seed", int, 0, ge=0, help="seed of the group order"),
    Param(
        "init",
        str,
        "activations",
        choices=("activations", "none"),
        help="start from the activation solution, or from no transforms",
    ),
]
