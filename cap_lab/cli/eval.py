"""``cap-lab eval``: CoT / log-likelihood accuracy and WikiText-2 perplexity of a model.

``--model`` takes anything :func:`cap_lab.models.load_model` does, so a pruned checkpoint
folder from ``cap-lab prune`` evaluates like any model. Runs are saved under ``--out`` and
reused when the settings and the weights are the same (``--force`` recomputes).
"""
from __future__ import annotations

import time

import torch

from cap_lab.cli.checks import check_data_source, check_runs_folder, count_or_all, int_at_least
from cap_lab.cli.common import add_data_dir_arg, add_model_args, add_prompt_style_arg, load_model_from_args
from cap_lab.evaluation.runner import EVAL_TASKS, evaluate, parse_tasks, results_table
from cap_lab.evaluation.settings import MODES, EvalSettings


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (CoT or log-likelihood accuracy, WikiText-2 perplexity)")
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(EVAL_TASKS), help=f"comma-separated, from {', '.join(EVAL_TASKS)}")
    p.add_argument("--mode", choices=MODES, default="cot", help=f"{', '.join(MODES)}: how reasoning tasks are scored")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="seeded random subset of N examples per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--out", default=None, help="folder for the saved runs (default: the cap_lab cache)")
    p.add_argument("--force", action="store_true", help="recompute even if a run with the same settings is saved")
    add_data_dir_arg(p)
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="prompts decoded together (CoT) / sequences per forward")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="CoT cap (default 512 GSM8K, 256 otherwise)")
    add_prompt_style_arg(p)
    p.add_argument("--ppl-seqlen", type=int_at_least(2), default=2048, help="WikiText-2 window length (capped by the context)")
    p.add_argument("--ppl-windows", type=count_or_all, default=100, help="WikiText-2 windows, or 'all' (paper: 100)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice; 1 "
                   "can be faster when other processes share the CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def format_table(results) -> str:
    table = results_table(results)
    columns = ["task", "mode", "metric", "value", "ci95", "n", "flexible", "complete", "steps", "gen_tokens",
               "truncated", "tokens", "seqlen", "sparsity", "seconds", "cached"]
    table = table[[c for c in columns if c in table and table[c].notna().any()]]
    return table.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")


def run(args) -> int:
    tasks = parse_tasks(args.tasks, args.mode)  # every check before the slow load
    check_runs_folder(args.out)
    check_data_source(args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_model_from_args(args)
    settings = EvalSettings(mode=args.mode, limit=args.limit, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            prompt_style=args.prompt_style, ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows,
                            batch_size=args.batch_size)
    results = evaluate(lm, tasks, settings, data_dir=args.data_dir, out_dir=args.out, force=args.force,
                       progress=not args.no_progress)
    print(f"model {lm.name} (fingerprint {next(iter(results.values())).model['fingerprint']})")
    print(format_table(results))
    for task, r in results.items():
        print(f"{task}: {r.path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
