"""Arguments shared by several sub-commands (model loading, calibration set).

Every flag value is checked by argparse (``type=``/``choices=``, see :mod:`cap_lab.cli.checks`),
so a bad one is reported with the flag's name before anything is loaded.
"""
from __future__ import annotations

import argparse

from cap_lab.calibration import CALIBRATION_SOURCES, CalibrationConfig
from cap_lab.cli.checks import DTYPES, device, device_map, int_at_least, task_list
from cap_lab.data import TASKS
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.prompts import GSM8K_FINALS, PROMPT_STYLES, TargetFormat


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda, cuda:N or mps, if this machine has it (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device-map", type=device_map, default=None,
                   help="passed to transformers: auto, balanced, balanced_low_0, sequential, a device, or a JSON "
                        "object of module name -> device (e.g. '{\"\": 0}')")


def load_model_from_args(args):
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def add_prompt_style_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                   help="auto (chat template when the tokenizer has one), chat or plain")


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="data folder (default: $CAP_LAB_DATA, else the hub, which needs the datasets package)")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-per-task", type=int_at_least(1), default=128, help="calibration examples per task (paper: 128-256)")
    p.add_argument("--subsets", type=int_at_least(1), default=3, help="K disjoint subsets (paper: 3-5)")
    p.add_argument("--calib-tasks", type=task_list, default=TASKS, help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int_at_least(8), default=512, help="token cap per calibration example (>= 8)")
    add_prompt_style_arg(p)
    p.add_argument("--gsm8k-final", choices=GSM8K_FINALS, default="hashes",
                   help="hashes (#### n) or answer_line (Answer: n)")
    p.add_argument("--calib-source", choices=CALIBRATION_SOURCES, default="reasoning",
                   help="calibration data: reasoning (the paper's tasks) or wikitext2 (as many windows of --max-length "
                        "WikiText-2 test tokens, after the ones perplexity evaluates; paper Sec. 6 ablation)")
    add_data_dir_arg(p)
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="calibration items per forward")


def calibration_config_from_args(args) -> CalibrationConfig:
    return CalibrationConfig(
        tasks=args.calib_tasks, n_per_task=args.calib_per_task, n_subsets=args.subsets, seed=args.seed,
        max_length=args.max_length, prompt_style=args.prompt_style, target=TargetFormat(gsm8k_final=args.gsm8k_final),
        source=args.calib_source,
    )
