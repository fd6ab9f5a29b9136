"""cap_lab: Causal Attribution Pruning (CAP) and its baselines, for Hugging Face causal LMs.

The pipeline (paper Sec. 3): build a reasoning calibration set (:mod:`cap_lab.calibration`),
score every attention head by masking it (:mod:`cap_lab.scoring`), turn head scores into
weight scores and prune to a global sparsity (:mod:`cap_lab.pruning`), save the checkpoint
(:mod:`cap_lab.saving`).
"""
__version__ = "0.1.0"
