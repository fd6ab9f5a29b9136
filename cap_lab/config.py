"""Named run profiles: what the notebooks and ``scripts/run_notebooks.py`` compute, and how big.

A profile is a frozen dataclass listing the models, the calibration set (paper Sec. 3.1: n per
task, K subsets, seed, max length), the scoring method, the pruning methods and sparsities
(Sec. 4), and the evaluation tasks and sizes (Sec. 4-5). Four are built in:

* ``ci``: the real default model on the real data with the smallest settings that still
  exercise every code path (every notebook runs end to end in CI);
* ``cpu``: the main job on a laptop-class CPU: the default model and ``gemma3-270m``, sized so
  notebooks 01-04 stay under 45 minutes on a 2-core machine (README, "What we measured").
  Log-likelihood accuracy and WikiText-2 perplexity carry the signal at this model size; CoT
  accuracy runs on a smaller limit. Its stability study is attribution's alone: exact scoring
  of two draws costs ~11 minutes even at 3 examples per task, so the exact rows (and the exact
  vs attribution comparison) run in ``cpu-full``;
* ``cpu-full``: Table 1 at the largest size this CPU allows in a few hours: the whole
  ARC-Challenge test and StrategyQA dev splits by log-likelihood and 40 WikiText-2 windows of
  2048 tokens, both models, every method at 10/20/50%. Its sweep stores every (model, method,
  sparsity, task) result in ``results/cpu-full`` (committed), so the run can stop anywhere and
  the next ``make figures PROFILE=cpu-full``, on this machine or another, goes on from there.
  Its notebook 02 adds exact scores to the stability study (3 per task, two draws) and
  compares them with attribution on draw 0;
* ``paper``: the paper's settings (Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.2 from the
  hub, 128 per task, K=3, 10/20/50% sparsity, full test sets, 100 windows of 2048 tokens of
  WikiText-2) for a GPU machine;

plus ``tiny``: a seeded random tiny Llama (:func:`cap_lab.models.tiny_random_model`), used by
the tests and the browser test, where only the plumbing matters.

A notebook picks its profile with its ``profile`` parameter; ``None`` means the
``CAP_LAB_PROFILE`` environment variable, else ``cpu``::

    >>> from cap_lab.config import get_profile
    >>> get_profile("ci").sparsities
    (0.1, 0.2, 0.5)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cap_lab.calibration import CalibrationConfig
from cap_lab.data import TASKS
from cap_lab.evaluation.settings import EvalSettings
from cap_lab.models import DEFAULT_MODEL, LoadedModel, load_model, tiny_random_model

DEFAULT_PROFILE = "cpu"
#: the pruning methods of Table 1's rows, besides Dense (a subset of cap_lab.pruning.PRUNE_METHODS)
TABLE1_METHODS = ("magnitude", "wanda", "cap")
#: the paper's sparsities (Table 1's columns), used by every profile that builds Table 1
TABLE1_SPARSITIES = (0.1, 0.2, 0.5)
TINY_PREFIX = "tiny-"  # "tiny-llama", "tiny-gemma3": seeded random test models
#: notebook 06's rows (defined in cap_lab.ablations.VARIANTS, which checks these names)
ALL_VARIANTS = ("magnitude", "wanda", "sparsegpt", "cap", "cap-neuron", "cap-activation", "cap-layer", "cap-row",
                "cap-activation-row", "cap-heads", "cap-wikitext2", "cap-mean", "cap-k2", "cap-k5")
#: the calibration of the ``cpu`` and ``cpu-full`` profiles' CAP, chosen by notebook 02's stability study
CPU_CALIBRATION = CalibrationConfig(n_per_task=128, n_subsets=3, max_length=64, draw=0)


@dataclass(frozen=True)
class EvalPlan:
    """Which evaluations each sweep cell gets, and how big (each becomes an :class:`EvalSettings`).

    Attributes:
        tasks: reasoning benchmarks; those with answer options (StrategyQA, ARC-Challenge) get
            option log-likelihood accuracy.
        cot_tasks: benchmarks that also get greedy chain-of-thought accuracy (GSM8K has no
            options, so CoT is its only accuracy).
        loglik_limit: examples per task for log-likelihood accuracy (``None``: the whole split).
        cot_limit: examples per task for greedy chain-of-thought accuracy (0: skip CoT).
        cot_max_new_tokens: generation budget of CoT (``None``: the evaluator's default).
        ppl_seqlen: WikiText-2 window length in tokens.
        ppl_windows: number of WikiText-2 windows (``None``: the whole test split).
        batch_size: sequences per forward.
        seed: which examples a limited evaluation takes.
    """

    tasks: tuple[str, ...] = TASKS
    cot_tasks: tuple[str, ...] = TASKS
    loglik_limit: int | None = 200
    cot_limit: int = 20
    cot_max_new_tokens: int | None = 256
    ppl_seqlen: int = 512
    ppl_windows: int | None = 8
    batch_size: int = 8
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(asdict(self), tasks=list(self.tasks), cot_tasks=list(self.cot_tasks))

    def loglik_settings(self) -> EvalSettings:
        """Settings of the log-likelihood accuracy runs."""
        return EvalSettings(mode="loglik", limit=self.loglik_limit, seed=self.seed, batch_size=self.batch_size)

    def cot_settings(self) -> EvalSettings:
        """Settings of the chain-of-thought accuracy runs."""
        return EvalSettings(mode="cot", limit=self.cot_limit or None, seed=self.seed,
                            max_new_tokens=self.cot_max_new_tokens, batch_size=self.batch_size)

    def perplexity_settings(self) -> EvalSettings:
        """Settings of the WikiText-2 perplexity run."""
        return EvalSettings(ppl_seqlen=self.ppl_seqlen, ppl_windows=self.ppl_windows, batch_size=self.batch_size)


@dataclass(frozen=True)
class Profile:
    """One named set of run settings.

    Attributes:
        name: ``ci``, ``cpu``, ``paper`` or ``tiny``.
        models: model aliases, folders or hub ids (``tiny-<arch>`` for random test models).
        calibration: the calibration set (n per task, K, seed, max length, tasks).
        stability: the head-score stability study of notebook 02 (:mod:`cap_lab.stability`):
            ``((scorer, (n_per_task, ...)), ...)``, two disjoint calibration draws per size.
        score_method: head scorer (``exact`` masks every head; see :mod:`cap_lab.scoring`).
        score_batch_size: calibration items per scoring forward.
        compare_scoring: other scorers shown beside ``score_method`` in notebook 02.
        magnitude_scope: ``layer`` (the same sparsity in every matrix) or ``global`` (one
            threshold) for the magnitude baseline; ``layer`` is much cheaper on a CPU.
        methods: pruning methods compared with the dense model.
        sparsities: target global sparsities.
        eval: evaluation sizes.
        explorer_sparsities: the slider's stops in notebook 05.
        ablation_variants: the rows of notebook 06's grid (:data:`cap_lab.ablations.VARIANTS`).
        ablation_sparsities: their unstructured sparsities.
        ablation_nm: their N:M patterns, ``((N, M), ...)``.
        ablation_results_dir: where the grid stores its cells, relative to the repository root
            (committed, like ``results_dir``: the grid takes hours on a CPU and resumes on any
            machine); ``None``: where the sweep stores its cells.
        figures_dir: where figures and tables go, relative to the repository root (``ci``
            and ``tiny`` write to the git-ignored ``executed/`` so the committed ``cpu``
            figures are never overwritten).
        results_dir: where the sweep stores its cells, relative to the repository root, for a
            run too long for one sitting (``cpu-full``): its entries are committed, so the run
            resumes on another machine; ``None``: the machine's cache (:mod:`cap_lab.sweep`).
        description: one line for reports.
    """

    name: str
    models: tuple[str, ...]
    calibration: CalibrationConfig
    stability: tuple[tuple[str, tuple[int, ...]], ...] = ()
    score_method: str = "exact"
    score_batch_size: int = 8
    compare_scoring: tuple[str, ...] = ("attribution",)
    magnitude_scope: str = "layer"
    methods: tuple[str, ...] = TABLE1_METHODS
    sparsities: tuple[float, ...] = TABLE1_SPARSITIES
    eval: EvalPlan = field(default_factory=EvalPlan)
    explorer_sparsities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    ablation_variants: tuple[str, ...] = ALL_VARIANTS
    ablation_sparsities: tuple[float, ...] = TABLE1_SPARSITIES
    ablation_nm: tuple[tuple[int, int], ...] = ((2, 4),)
    ablation_results_dir: str | None = None
    figures_dir: str = "figures"
    results_dir: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in TABLE1_METHODS]
        if bad:
            raise ValueError(f"methods {bad!r}; allowed: {', '.join(TABLE1_METHODS)}")
        bad = [s for s in self.sparsities + self.explorer_sparsities if not 0.0 < s < 1.0]
        if bad:
            raise ValueError(f"sparsities {bad!r} are outside (0, 1)")
        if not self.models:
            raise ValueError(f"profile {self.name!r} lists no models")
        bad = [m for m, _ in self.stability if m not in ("exact", "attribution", "reference")]
        if bad:
            raise ValueError(f"stability scorers {bad!r}; allowed: exact, attribution, reference")

    def comparison_calibration(self) -> CalibrationConfig:
        """The calibration set on which notebook 02 compares the scorers of ``compare_scoring``.

        Draw 0 at the smallest stability-study size that every one of them (and
        ``score_method``) is studied at, so the comparison reuses the study's cached scores;
        the profile's own calibration when there is no such size.
        """
        methods = {self.score_method, *self.compare_scoring}
        sizes = [set(ns) for m, ns in self.stability if m in methods]
        common = set.intersection(*sizes) if len(sizes) == len(methods) else set()
        if not common:
            return self.calibration
        return replace(self.calibration, n_per_task=min(common), draw=0)

    def to_dict(self) -> dict:
        """JSON-ready settings (recorded in the figure manifest)."""
        return dict(
            name=self.name, models=list(self.models), calibration=self.calibration.to_dict(),
            stability=[[m, list(ns)] for m, ns in self.stability], score_method=self.score_method,
            compare_scoring=list(self.compare_scoring),
            magnitude_scope=self.magnitude_scope,
            methods=list(self.methods), sparsities=list(self.sparsities), eval=self.eval.to_dict(),
            explorer_sparsities=list(self.explorer_sparsities), figures_dir=self.figures_dir,
            results_dir=self.results_dir, ablation_variants=list(self.ablation_variants),
            ablation_sparsities=list(self.ablation_sparsities), ablation_nm=[list(p) for p in self.ablation_nm],
            ablation_results_dir=self.ablation_results_dir,
        )



PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="tiny",
            models=("tiny-llama",),
            calibration=CalibrationConfig(n_per_task=4, n_subsets=2, max_length=64, draw=0),
            score_method="exact",
            stability=(("exact", (2, 4)), ("attribution", (2, 4))),
            sparsities=TABLE1_SPARSITIES,
            eval=EvalPlan(loglik_limit=3, cot_limit=1, cot_max_new_tokens=8, ppl_seqlen=32, ppl_windows=1, batch_size=4),
            ablation_variants=tuple(v for v in ALL_VARIANTS if v != "cap-k5"),
            ablation_sparsities=(0.5,),
            figures_dir="executed/figures-tiny",
            description="seeded random tiny Llama: plumbing only (tests, browser test)",
        ),
        Profile(
            name="ci",
            models=(DEFAULT_MODEL,),
            calibration=CalibrationConfig(n_per_task=2, n_subsets=2, max_length=64, draw=0),
            score_method="attribution",  # exact: ~0.7 s per calibration token here
            compare_scoring=(),
            stability=(("attribution", (2,)),),
            sparsities=TABLE1_SPARSITIES,
            eval=EvalPlan(cot_tasks=("gsm8k",), loglik_limit=2, cot_limit=1, cot_max_new_tokens=8, ppl_seqlen=128,
                              ppl_windows=1, batch_size=4),
            explorer_sparsities=(0.2, 0.5),
            ablation_variants=tuple(v for v in ALL_VARIANTS if v != "cap-k5"),
            ablation_sparsities=(0.5,),
            figures_dir="executed/figures-ci",
            description="real default model, smallest settings that exercise every code path",
        ),
        Profile(
            name="cpu",
            models=(DEFAULT_MODEL, "gemma3-270m"),
            # chosen by the stability study of notebook 02 (README, "Head-score stability"):
            # exact scores of 3 items per task from two disjoint draws barely agree (cpu-full's
            # study), and exact scoring costs ~0.3 s per calibration token here; attribution
            # scores of 128 per task (the paper's size) do (see figures/02_stability.md)
            calibration=CPU_CALIBRATION,
            score_method="attribution",
            compare_scoring=(),
            stability=(("attribution", (3, 8, 32, 128)),),
            ablation_results_dir="results/cpu-ablations",
            sparsities=TABLE1_SPARSITIES,
            eval=EvalPlan(cot_tasks=("gsm8k",), loglik_limit=40, cot_limit=8, cot_max_new_tokens=96, ppl_seqlen=512,
                              ppl_windows=4, batch_size=8),
            figures_dir="figures",
            description="laptop-class CPU: default model + gemma3-270m, attribution scores of 128 per task",
        ),
        Profile(
            name="cpu-full",
            models=(DEFAULT_MODEL, "gemma3-270m"),
            calibration=CPU_CALIBRATION,
            score_method="attribution",
            compare_scoring=("exact",),
            stability=(("exact", (3,)), ("attribution", (3, 8, 32, 128))),
            sparsities=TABLE1_SPARSITIES,
            eval=EvalPlan(cot_tasks=(), loglik_limit=None, cot_limit=0, ppl_seqlen=2048, ppl_windows=40, batch_size=8),
            figures_dir="figures/cpu-full",
            results_dir="results/cpu-full",
            description="Table 1 at the largest size a 2-core CPU allows: whole ARC-Challenge test and StrategyQA dev "
                        "splits (log-likelihood), 40 WikiText-2 windows of 2048 tokens; hours, resumable",
        ),
        Profile(
            name="paper",
            models=("meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.2"),
            calibration=CalibrationConfig(n_per_task=128, n_subsets=3, max_length=512),
            score_method="exact",
            score_batch_size=16,
            magnitude_scope="global",
            sparsities=(0.1, 0.2, 0.5),
            eval=EvalPlan(loglik_limit=None, cot_limit=100_000, cot_max_new_tokens=512, ppl_seqlen=2048, ppl_windows=100, batch_size=16),
            figures_dir="figures/paper",
            description="the paper's settings, for a GPU machine",
        ),
    )
}


def get_profile(name: str | Profile | None = None) -> Profile:
    """The profile called ``name``; ``None`` reads ``CAP_LAB_PROFILE`` (default ``cpu``).

    Raises:
        ValueError: an unknown name (lists the known ones).
    """
    if isinstance(name, Profile):
        return name
    chosen = name or os.environ.get("CAP_LAB_PROFILE") or DEFAULT_PROFILE
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile {chosen!r}; known: {', '.join(PROFILES)}")
    return PROFILES[chosen]


def repo_root() -> Path:
    """The checkout this package runs from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def figures_dir(profile: Profile) -> Path:
    """Output folder of a profile's figures: ``$CAP_LAB_FIGURES`` if set, else the profile's.

    Only a path: writing a figure (:func:`cap_lab.plotting.save_output`) creates the folder.
    """
    chosen = os.environ.get("CAP_LAB_FIGURES")
    return Path(chosen) if chosen else repo_root() / profile.figures_dir


def load_profile_model(name: str, device: str | None = None) -> LoadedModel:
    """``load_model`` that also accepts ``tiny-<arch>`` (a seeded random tiny model)."""
    if name.startswith(TINY_PREFIX):
        lm = tiny_random_model(name[len(TINY_PREFIX):], seed=0)
        lm.name = name
        return lm
    return load_model(name, device=device)
