"""``cap-lab eval``: CoT / log-likelihood accuracy and WikiText-2 perplexity of a model.

``--model`` takes anything :func:`cap_lab.models.load_model` does, so a pruned checkpoint
folder from ``cap-lab prune`` evaluates like any model. Runs are saved under ``--out`` and
reused when the settings and the weights are the same (``--force`` recomputes).
"""
from __future__ import annotations

import time

import torch

from cap_lab.cli.common import add_model_args, load_model_from_args
from cap_lab.evaluation.runner import EVAL_TASKS, MODES, evaluate, parse_tasks, results_table


def _windows(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise ValueError(f"--ppl-windows {value}; must be >= 1 or 'all'")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (CoT or log-likelihood accuracy, WikiText-2 perplexity)")
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(EVAL_TASKS), help=f"comma-separated, from {', '.join(EVAL_TASKS)}")
    p.add_argument("--mode", default="cot", help=f"{', '.join(MODES)}: how reasoning tasks are scored")
    p.add_argument("--limit", type=int, default=None, help="seeded random subset of N examples per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--out", default=None, help="folder for the saved runs (default: the cap_lab cache)")
    p.add_argument("--force", action="store_true", help="recompute even if a run with the same settings is saved")
    p.add_argument("--data-dir", default=None, help="data folder (default: $CAP_LAB_DATA, else the hub)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (CoT) / sequences per forward")
    p.add_argument("--max-new-tokens", type=int, default=None, help="CoT cap (default 512 GSM8K, 256 otherwise)")
    p.add_argument("--prompt-style", default="auto", help="auto, chat or plain")
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="WikiText-2 window length (capped by the context)")
    p.add_argument("--ppl-windows", type=str, default="100", help="WikiText-2 windows, or 'all' (paper: 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 can be "
                   "faster when other processes share the CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def format_table(results) -> str:
    table = results_table(results)
    columns = ["task", "mode", "metric", "value", "ci95", "n", "flexible", "complete", "steps", "gen_tokens",
               "truncated", "tokens", "seqlen", "sparsity", "seconds", "cached"]
    table = table[[c for c in columns if c in table and table[c].notna().any()]]
    return table.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")


def run(args) -> int:
    tasks = parse_tasks(args.tasks, args.mode)  # validate before the slow load
    windows = _windows(args.ppl_windows)
    for name in ("limit", "batch_size", "max_new_tokens", "ppl_seqlen", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}; must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_model_from_args(args)
    results = evaluate(lm, tasks, mode=args.mode, limit=args.limit, seed=args.seed, out_dir=args.out,
                       force=args.force, data_dir=args.data_dir, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style,
                       ppl_seqlen=args.ppl_seqlen, ppl_windows=windows, progress=not args.no_progress)
    print(f"model {lm.name} (fingerprint {next(iter(results.values())).model['fingerprint']})")
    print(format_table(results))
    for task, r in results.items():
        print(f"{task}: {r.path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
