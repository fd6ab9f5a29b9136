"""Arguments shared by several sub-commands (model loading, calibration set)."""
from __future__ import annotations

import argparse

from cap_lab.calibration import CalibrationConfig
from cap_lab.data import TASKS
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.prompts import TargetFormat


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device-map", default=None, help="passed to transformers, e.g. auto")


def load_model_from_args(args):
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def task_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-per-task", type=int, default=128, help="calibration examples per task (paper: 128-256)")
    p.add_argument("--subsets", type=int, default=3, help="K disjoint subsets (paper: 3-5)")
    p.add_argument("--calib-tasks", type=task_list, default=TASKS, help="comma-separated tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512, help="token cap per calibration example")
    p.add_argument("--prompt-style", default="auto", help="auto, chat or plain")
    p.add_argument("--gsm8k-final", default="hashes", help="hashes (#### n) or answer_line (Answer: n)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $CAP_LAB_DATA, else the hub)")
    p.add_argument("--batch-size", type=int, default=8)


def calibration_config_from_args(args) -> CalibrationConfig:
    return CalibrationConfig(
        tasks=args.calib_tasks, n_per_task=args.calib_per_task, n_subsets=args.subsets, seed=args.seed,
        max_length=args.max_length, prompt_style=args.prompt_style, target=TargetFormat(gsm8k_final=args.gsm8k_final),
    )
