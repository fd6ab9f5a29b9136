"""Causal head scores (paper Sec. 3.2, Eq. 1-2): mask each attention head, measure the loss.

Modules, imported one way only (``types`` <- each scorer <- ``api``; ``compare`` reads scores):

* :mod:`~cap_lab.scoring.types`: :class:`HeadScores` and Eq. 2 (:func:`aggregate_scores`);
* :mod:`~cap_lab.scoring.reference`: the slow, obvious exact scorer;
* :mod:`~cap_lab.scoring.exact`: the same numbers, fast and resumable;
* :mod:`~cap_lab.scoring.attribution`: a first-order estimate from one backward pass;
* :mod:`~cap_lab.scoring.compare`: how two score sets agree (ranks, top heads, pruning);
* :mod:`~cap_lab.scoring.neurons`: MLP-neuron scores, first-order, with an exact check on a sample;
* :mod:`~cap_lab.scoring.api`: :func:`head_scores`, the cached entry point.

Example::

    from cap_lab.calibration import CalibrationConfig, build_calibration_set
    from cap_lab.models import load_model
    from cap_lab.scoring import head_scores

    lm = load_model()
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=128))
    scores = head_scores(lm, calib)          # (L, H) in scores.scores
"""
from cap_lab.scoring.api import SCORING_METHODS, SCORING_VERSION, head_scores, progress_dir, score_payload
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.scoring.compare import ScoreAgreement, compare_scores
from cap_lab.scoring.exact import score_heads_exact
from cap_lab.scoring.neurons import NeuronAblationCheck, NeuronScores, check_neuron_scores, score_neurons_attribution
from cap_lab.scoring.reference import score_heads_reference
from cap_lab.scoring.types import AGGREGATES, HeadScores, aggregate_scores

__all__ = [
    "AGGREGATES", "HeadScores", "NeuronAblationCheck", "NeuronScores", "SCORING_METHODS", "SCORING_VERSION",
    "ScoreAgreement", "aggregate_scores", "check_neuron_scores", "compare_scores", "head_scores", "progress_dir",
    "score_heads_attribution", "score_heads_exact", "score_heads_reference", "score_neurons_attribution",
    "score_payload",
]
