"""Evaluation of dense and pruned models (paper Sec. 4, 5, 6.1, App. B; Table 1).

* :mod:`~cap_lab.evaluation.cot`: greedy chain-of-thought accuracy, strict and flexible
  (GSM8K, StrategyQA, ARC-Challenge), with reasoning-chain statistics
  (:mod:`~cap_lab.evaluation.chains`, Sec. 6.1);
* :mod:`~cap_lab.evaluation.loglik`: option log-likelihood accuracy (StrategyQA, ARC-Challenge);
* :mod:`~cap_lab.evaluation.perplexity`: WikiText-2 perplexity, Wanda/SparseGPT protocol;
* :mod:`~cap_lab.evaluation.generation`: batched greedy decoding (left padding, KV cache);
* :mod:`~cap_lab.evaluation.extraction`: strict and flexible answer extraction;
* :mod:`~cap_lab.evaluation.results`: :class:`EvalResult`, Wilson intervals, saved runs;
* :mod:`~cap_lab.evaluation.settings`: :class:`EvalSettings`, how every evaluation is run;
* :mod:`~cap_lab.evaluation.runner`: :func:`evaluate`, one call for several tasks.

Example::

    from cap_lab.models import load_model
    from cap_lab.evaluation import EvalSettings, evaluate, results_table

    lm = load_model("smollm2-135m-instruct")
    results = evaluate(lm, ["gsm8k", "wikitext2"], EvalSettings(limit=20, ppl_windows=4), out_dir="runs/dense")
    print(results_table(results))
"""
from cap_lab.evaluation.chains import ChainStats, chain_stats, summarize_chains
from cap_lab.evaluation.cot import DEFAULT_MAX_NEW_TOKENS, cot_accuracy
from cap_lab.evaluation.extraction import answers_match, extract_flexible, extract_strict, normalize_number, numbers_equal
from cap_lab.evaluation.generation import Generation, generate_greedy, stop_token_ids
from cap_lab.evaluation.loglik import LOGLIK_TASKS, continuation_logprobs, loglik_accuracy
from cap_lab.evaluation.perplexity import token_windows, wikitext2_perplexity
from cap_lab.evaluation.results import EvalResult, describe_model, read_records, wilson_interval
from cap_lab.evaluation.runner import EVAL_TASKS, evaluate, results_table
from cap_lab.evaluation.settings import MODES, EvalSettings

__all__ = [
    "ChainStats", "DEFAULT_MAX_NEW_TOKENS", "EVAL_TASKS", "EvalResult", "EvalSettings", "Generation", "LOGLIK_TASKS", "MODES",
    "answers_match", "chain_stats", "continuation_logprobs", "cot_accuracy", "describe_model", "evaluate",
    "extract_flexible", "extract_strict", "generate_greedy", "loglik_accuracy", "normalize_number", "numbers_equal",
    "read_records", "results_table", "stop_token_ids", "summarize_chains", "token_windows", "wikitext2_perplexity",
    "wilson_interval",
]
