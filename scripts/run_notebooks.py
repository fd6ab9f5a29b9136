#!/usr/bin/env python
"""Run the notebooks headless with nbclient under one profile; executed copies go to executed/.

    python scripts/run_notebooks.py --profile cpu          # notebooks 01-04: regenerate figures/
    python scripts/run_notebooks.py --profile cpu-full     # the same, hours: figures/cpu-full (resumable)
    python scripts/run_notebooks.py --profile ci --all     # every notebook, CI-sized

The kernel reads the profile from ``CAP_LAB_PROFILE`` (set here). Each notebook runs in its own
fresh kernel, in order, with ``notebooks/`` as working directory; the executed copy (with
outputs) is written to ``executed/<profile>/`` (git-ignored), and the wall time of each notebook
(and when it finished) to ``executed/<profile>/timings.json``. After a run that writes into the committed ``figures/``
folder, ``figures/README.md`` is regenerated from ``figures/MANIFEST.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MAIN_JOB = ("01_calibration", "02_head_importance", "03_sparsity_sweep", "04_perplexity_vs_accuracy")


def run_notebook(path: Path, out_dir: Path, timeout: int) -> float:
    """Execute one notebook in a fresh kernel; write the executed copy; return seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("CAP_LAB_PROFILE", "cpu"), help="ci, cpu, cpu-full, paper or tiny (default cpu)")
    parser.add_argument("--all", action="store_true", help="also run 05_explorer (default: the main job, 01-04)")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run, e.g. 01 03")
    parser.add_argument("--out", default=None, help="folder for executed copies (default executed/<profile>)")
    parser.add_argument("--timeout", type=int, default=86400,
                        help="seconds per cell (default a day: the cpu-full sweep runs for hours)")
    args = parser.parse_args(argv)

    os.environ["CAP_LAB_PROFILE"] = args.profile
    from cap_lab.config import figures_dir, get_profile
    from cap_lab.plotting import write_figures_readme

    profile = get_profile(args.profile)
    names = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        names = [n for n in names if any(n.startswith(o) for o in args.only)]
    elif not args.all:
        names = [n for n in names if n in MAIN_JOB]
    out_dir = Path(args.out) if args.out else ROOT / "executed" / profile.name
    timings_file = out_dir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    total = time.perf_counter()
    for name in names:
        print(f"[{profile.name}] {name} ...", flush=True)
        seconds = run_notebook(NOTEBOOKS / f"{name}.ipynb", out_dir, args.timeout)
        timings[name] = {"seconds": round(seconds, 1),
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        out_dir.mkdir(parents=True, exist_ok=True)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"[{profile.name}] {name}: {seconds:.0f} s", flush=True)
    print(f"[{profile.name}] total {time.perf_counter() - total:.0f} s; executed copies in {out_dir}")
    write_figures_readme(figures_dir(profile), profile, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
