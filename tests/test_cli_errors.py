"""``cap-lab`` user mistakes: one ``cap-lab: error:`` line, exit status 2, found before any slow work.

Each test is a finding of a black-box test of the command line. ``no_load`` makes loading a
model fail the test, so a check that passes with it runs before the slow work.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cap_lab.cli import build_parser, main
from cap_lab.io import atomic_write_text
from cap_lab.models import load_model, tiny_random_model
from cap_lab.saving import check_can_create, check_output_folder, read_prune_info, save_pruned


@pytest.fixture(scope="module")
def tiny_fingerprint(tiny_dir):
    return load_model(str(tiny_dir), device="cpu").fingerprint


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr("cap_lab.cli.common.load_model", refuse)


def one_error_line(argv, capsys, after_load: bool = False) -> str:
    """Run ``cap-lab argv``; assert exit 2 and stderr ending with its only ``cap-lab: error:`` line.

    (Errors found after loading the model follow transformers' loading progress bar.)
    """
    capsys.readouterr()  # drop what earlier commands printed
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("cap-lab: error:") and err.count("cap-lab: error:") == 1, err
    assert "Traceback" not in err and (after_load or len(lines) == 1), err
    return lines[-1]


def files_under(*roots: Path) -> dict[str, str]:
    return {str(p): p.read_text() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


def prune_args(model, out, *extra):
    return ["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.2", "--device", "cpu",
            "--out", out, *extra]


# ------------------------------------------------------------------ 1. --overwrite deletes only its own checkpoints
@pytest.mark.parametrize("out", [".", "..", "/", "~", "CWD"])
def test_overwrite_refuses_cwd_parents_home_and_root_and_deletes_nothing(out, tmp_path, monkeypatch, capsys, no_load):
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work / "sub", home):
        folder.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "data.csv").write_text("1,2")
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = files_under(work, home)
    err = one_error_line(prune_args("whatever", str(work) if out == "CWD" else out, "--overwrite"), capsys)
    assert "refusing" in err and ("current folder" in err or "above" in err or "home" in err)
    assert files_under(work, home) == before


def test_overwrite_refuses_a_folder_cap_lab_did_not_write(tmp_path, capsys, no_load):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b")
    (tmp_path / "results" / "cap_lab.json").write_text('{"not": "ours"}')  # a marker without cap_lab_version
    err = one_error_line(prune_args("whatever", tmp_path / "results", "--overwrite"), capsys)
    assert "cap_lab did not write it" in err and "table.csv" in err
    assert (tmp_path / "results" / "table.csv").read_text() == "a,b"


def test_overwrite_refuses_a_symbolic_link(tmp_path, capsys, no_load):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert "symbolic link" in one_error_line(prune_args("whatever", tmp_path / "link", "--overwrite"), capsys)


def test_overwrite_replaces_a_cap_lab_checkpoint_or_an_empty_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(str(tiny_dir), str(out))) == 0
    assert "exists" in one_error_line(prune_args(str(tiny_dir), out), capsys)  # no --overwrite
    assert main(prune_args(str(tiny_dir), str(out), "--overwrite")) == 0
    assert read_prune_info(out)["method"] == "magnitude"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", overwrite=True) == tmp_path / "empty"
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_save_pruned_refuses_a_foreign_folder_before_writing(tmp_path):
    lm = tiny_random_model("llama")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("\\section{}")
    with pytest.raises(ValueError, match="thesis.tex"):
        save_pruned(lm.model, lm.tokenizer, tmp_path / "mine", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["cache", "mine"]  # no temporary folder either
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


# ------------------------------------------------------------------ 2. unwritable destinations, found up front
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
@pytest.mark.parametrize("command", ["prune", "score"])
def test_unwritable_out_is_refused_before_loading(where, command, tmp_path, capsys, no_load, data_dir):
    """As root, permission bits are ignored, so the honest unwritable places are a path under a
    regular file and /proc, which refuses new entries even to root (os.access says it may)."""
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/cap_lab_test_out")
    else:
        (tmp_path / "file.txt").write_text("x")
        out = tmp_path / "file.txt" / "out"
    argv = (prune_args("whatever", out) if command == "prune"
            else ["score", "--model", "whatever", "--data-dir", data_dir, "--out", out / "scores.json"])
    err = one_error_line(argv, capsys)
    assert "cannot create" in err and ("is a file" in err if where == "under_a_file" else "/proc" in err)


def test_the_write_probe_does_not_trust_permission_bits(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    with pytest.raises(PermissionError, match="/proc"):
        check_can_create("/proc/cap_lab_probe/out")
    assert check_can_create(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not list((tmp_path).glob(".cap_lab-write-probe-*"))  # the probe is removed


# ------------------------------------------------------------------ 3. --out of the wrong kind
def test_score_out_must_not_be_a_folder(tmp_path, capsys, no_load, data_dir):
    err = one_error_line(["score", "--data-dir", data_dir, "--out", tmp_path], capsys)
    assert "is a folder" in err and "scores.json" in err


def test_prune_out_must_not_be_a_file_even_with_overwrite(tmp_path, capsys, no_load):
    (tmp_path / "model.bin").write_text("precious")
    err = one_error_line(prune_args("whatever", tmp_path / "model.bin", "--overwrite"), capsys)
    assert "is an existing file, not a folder" in err
    assert (tmp_path / "model.bin").read_text() == "precious"


def test_eval_out_must_be_a_folder(tmp_path, capsys, no_load, data_dir):
    (tmp_path / "runs").write_text("not a folder")
    err = one_error_line(["eval", "--data-dir", data_dir, "--out", tmp_path / "runs"], capsys)
    assert "is a file; it must be a folder" in err


# ------------------------------------------------------------------ 4. --device and --dtype
def _absent_devices() -> list[str]:
    absent = ["bogus", f"cuda:{torch.cuda.device_count()}"]
    if not torch.cuda.is_available():
        absent.append("cuda")
    if not torch.backends.mps.is_available():
        absent.append("mps")
    return absent


@pytest.mark.parametrize("device", _absent_devices())
@pytest.mark.parametrize("command", ["score", "prune", "eval"])
def test_device_must_exist_on_this_machine(device, command, capsys, no_load):
    extra = ["--sparsity", "0.2", "--out", "x"] if command == "prune" else []
    err = one_error_line([command, "--device", device, *extra], capsys)
    assert "--device" in err and repr(device) in err and "cpu" in err  # what is available here


def test_device_and_dtype_accept_what_exists():
    args = build_parser().parse_args(["score", "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")


@pytest.mark.parametrize("value, needle", [
    ("autoo", "'autoo' is not a device map; allowed: auto, balanced"),
    ("{not json", "is not valid JSON"),
    ("[]", "'[]' is not a device map"),
    ("{}", "is not a non-empty JSON object"),
    ('{"model": 99}', "module 'model' maps to GPU 99, but this machine has"),
    ('{"model": "bogus"}', "module 'model': 'bogus' is not a device"),
    ('{"model": 1.5}', "module 'model' maps to 1.5"),
])
def test_device_map_is_checked_before_loading(value, needle, capsys, no_load):
    err = one_error_line(["score", "--device-map", value], capsys)
    assert "--device-map" in err and needle in err


def test_device_map_accepts_strategies_devices_and_module_maps():
    parse = lambda v: build_parser().parse_args(["score", "--device-map", v]).device_map  # noqa: E731
    assert parse("auto") == "auto" and parse("sequential") == "sequential" and parse("cpu") == "cpu"
    assert parse('{"model": "cpu", "lm_head": "disk"}') == {"model": "cpu", "lm_head": "disk"}


def test_dtype_names_the_allowed_ones(capsys, no_load):
    err = one_error_line(["score", "--dtype", "float8"], capsys)
    assert "--dtype" in err and "float8" in err and "bfloat16" in err


# ------------------------------------------------------------------ 5. --scores files
NAN_ONE = [[0.1, 0.2, float("nan"), 0.4]] + [[0.1, 0.2, 0.3, 0.4]] * 2
BAD_SCORES = {
    "list": ("[[0.1, 0.2]]", "JSON list"),
    "no_scores_key": ('{"model": "tiny", "aggregate": "median"}', "no 'scores' key"),
    "unparsable": ('{"scores": [[0.1, 0.2', "not valid JSON"),
    "one_nan": (json.dumps({"scores": NAN_ONE}), "1 NaN or infinite"),
    "all_nan": (json.dumps({"scores": [[math.nan] * 4] * 3}), "12 NaN or infinite"),
    "one_inf": (json.dumps({"scores": [[math.inf, 0, 0, 0]] + [[0] * 4] * 2}), "L0H0=inf"),
    "ragged": (json.dumps({"scores": [[0.1, 0.2], [0.3]]}), "different lengths"),
    "strings": (json.dumps({"scores": [["0.1", "0.2"]]}), "not numbers"),
    "empty": (json.dumps({"scores": []}), "non-empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_bad_scores_file_is_refused_before_loading(case, tmp_path, capsys, no_load):
    text, needle = BAD_SCORES[case]
    (tmp_path / "s.json").write_text(text)
    err = one_error_line(["prune", "--sparsity", "0.2", "--scores", tmp_path / "s.json", "--out", tmp_path / "o"], capsys)
    assert needle in err and str(tmp_path / "s.json") in err
    assert not (tmp_path / "o").exists()


def test_missing_scores_file_is_named(tmp_path, capsys, no_load):
    err = one_error_line(["prune", "--sparsity", "0.2", "--scores", tmp_path / "nope.json", "--out", tmp_path / "o"], capsys)
    assert "nope.json" in err and "does not exist" in err


def _scores_json(path: Path, model: dict | None, version: int, shape=(3, 4), **extra) -> Path:
    data = {"scores": torch.randn(shape, generator=torch.Generator().manual_seed(0)).tolist(), **extra}
    if version == 2:
        data["model"] = model
    else:  # files written before the top-level identity: it is only in the cache payload
        data |= {"model": model["name"], "settings": {"payload": {"model": model}, "key": "k"}}
    atomic_write_text(path, json.dumps(data))
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_scores_of_another_model_are_refused_naming_both_fingerprints(version, tiny_dir, tiny_fingerprint, tmp_path, capsys):
    other = tiny_random_model("llama", seed=1).identity()
    assert other["fingerprint"] != tiny_fingerprint
    path = _scores_json(tmp_path / "s.json", other, version)
    err = one_error_line(["prune", "--model", tiny_dir, "--sparsity", "0.2", "--scores", path, "--out", tmp_path / "o"], capsys, after_load=True)
    assert other["fingerprint"] in err and tiny_fingerprint in err and "s.json" in err
    assert not (tmp_path / "o").exists()


def test_scores_of_another_dtype_suggest_the_dtype(tiny_dir, tmp_path, capsys):
    path = _scores_json(tmp_path / "s.json", {"name": "tiny", "fingerprint": "0" * 16, "dtype": "bfloat16"}, 2)
    err = one_error_line(["prune", "--model", tiny_dir, "--sparsity", "0.2", "--scores", path, "--out", tmp_path / "o"], capsys, after_load=True)
    assert "--dtype bfloat16" in err


def test_scores_of_the_wrong_shape_are_refused_naming_the_file(tiny_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"scores": [[0.1, 0.2, 0.3, 0.4]] * 2}))  # 2 layers; the model has 3
    err = one_error_line(["prune", "--model", tiny_dir, "--sparsity", "0.2", "--scores", path, "--out", tmp_path / "o"], capsys, after_load=True)
    assert "(2, 4)" in err and "(3, 4)" in err and "s.json" in err


def test_prune_records_the_calibration_of_the_scores_it_used(tiny_dir, tiny_fingerprint, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CAP_LAB_DATA", raising=False)  # --scores needs no calibration data here
    calibration = {"n_per_task": 2, "n_subsets": 2, "max_length": 32, "tasks": ["gsm8k"], "seed": 7}
    path = _scores_json(tmp_path / "s.json", {"name": str(tiny_dir), "fingerprint": tiny_fingerprint}, 2,
                        calibration=calibration, method="exact", aggregate="mean")
    argv = ["prune", "--model", tiny_dir, "--sparsity", "0.2", "--scores", path, "--out", tmp_path / "o",
            "--calib-per-task", "5", "--subsets", "5", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    info = read_prune_info(tmp_path / "o")
    assert info["calibration"] == calibration  # not this command's --calib-per-task 5 --subsets 5
    assert info["scores"]["file"] == str(path) and info["scores"]["aggregate"] == "mean"
    assert info["scores"]["model"]["fingerprint"] == tiny_fingerprint


def test_prune_records_the_calibration_of_scores_computed_in_process(tiny_dir, data_dir, tmp_path):
    argv = ["prune", "--model", tiny_dir, "--sparsity", "0.2", "--out", tmp_path / "o", "--data-dir", data_dir,
            "--calib-per-task", "2", "--subsets", "2", "--max-length", "16", "--calib-tasks", "gsm8k", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    info = read_prune_info(tmp_path / "o")
    assert info["calibration"]["n_per_task"] == 2 and info["calibration"]["tasks"] == ["gsm8k"]
    assert info["scores"]["file"] is None and info["scores"]["method"] == "exact" and info["score_cache_key"]


# ------------------------------------------------------------------ 6. messages that say what to do
@pytest.mark.parametrize("argv", [["score"], ["eval", "--tasks", "gsm8k"], ["prune", "--method", "wanda", "--sparsity", "0.2"]])
def test_no_data_source_says_how_to_give_one(argv, tmp_path, monkeypatch, capsys, no_load):
    monkeypatch.delenv("CAP_LAB_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `datasets` absent, even where it is installed
    monkeypatch.chdir(tmp_path)
    err = one_error_line(argv + (["--out", "o"] if argv[0] == "prune" else []), capsys)
    assert "CAP_LAB_DATA" in err and "--data-dir" in err and "gsm8k/train.jsonl" in err and "install `datasets`" in err


def test_library_without_data_source_says_how_to_give_one(monkeypatch):
    from cap_lab.data import load_task
    monkeypatch.delenv("CAP_LAB_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="CAP_LAB_DATA"):
        load_task("gsm8k", "train")


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--ppl-windows", "abc"], ["--ppl-windows", "'abc'", "'all'"]),
    (["eval", "--ppl-windows", "0"], ["--ppl-windows", ">= 1"]),
    (["eval", "--limit", "0"], ["--limit", ">= 1"]),
    (["eval", "--batch-size", "-3"], ["--batch-size", ">= 1"]),
    (["eval", "--ppl-seqlen", "1"], ["--ppl-seqlen", ">= 2"]),
    (["eval", "--threads", "0"], ["--threads", ">= 1"]),
    (["eval", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["eval", "--mode", "sample"], ["--mode", "loglik"]),
    (["prune", "--sparsity", "1.5", "--out", "x"], ["--sparsity", "[0, 1)"]),
    (["prune", "--sparsity", "-0.1", "--out", "x"], ["--sparsity", "[0, 1)"]),
    (["prune", "--sparsity", "half", "--out", "x"], ["--sparsity", "'half'", "not a number"]),
    (["prune", "--sparsity", "0.2", "--method", "obd", "--out", "x"], ["--method", "'obd'", "wanda"]),
    (["prune", "--sparsity", "0.2", "--kv-reduce", "min", "--out", "x"], ["--kv-reduce", "max"]),
    (["score", "--calib-per-task", "0"], ["--calib-per-task", ">= 1"]),
    (["score", "--subsets", "0"], ["--subsets", ">= 1"]),
    (["score", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["score", "--max-length", "4"], ["--max-length", ">= 8"]),
    (["score", "--memory-budget-mb", "0"], ["--memory-budget-mb", "> 0"]),
    (["score", "--memory-budget-mb", "nan"], ["--memory-budget-mb", "> 0"]),
    (["score", "--aggregate", "max"], ["--aggregate", "median"]),
    (["score", "--method", "fast"], ["--method", "attribution"]),
    (["score", "--prompt-style", "fancy"], ["--prompt-style", "chat"]),
    (["score", "--gsm8k-final", "last"], ["--gsm8k-final", "answer_line"]),
    (["score", "--calib-tasks", "gsm8k,mmlu"], ["--calib-tasks", "mmlu", "strategyqa"]),
])
def test_bad_flag_values_name_the_flag_and_what_is_allowed(argv, needles, capsys, no_load):
    err = one_error_line(argv, capsys)
    assert all(n in err for n in needles), err


def test_help_exits_zero(capsys):
    assert main(["prune", "--help"]) == 0
    assert "--overwrite" in capsys.readouterr().out


def test_a_transformers_release_that_cannot_be_replayed_is_one_line(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    from cap_lab.modeling import ReplayError

    def unsupported(*args, **kwargs):
        raise ReplayError("decoder layer 0 got 'cache' of type Odd (transformers 9.9.9); cap_lab cannot replay")

    monkeypatch.setattr("cap_lab.cli.score.head_scores", unsupported)
    line = one_error_line(["score", "--model", tiny_dir, "--data-dir", data_dir, "--calib-per-task", 2, "--subsets", 2,
                           "--max-length", 32, "--out", tmp_path / "s.json"], capsys, after_load=True)
    assert "transformers 9.9.9" in line


def test_prune_wanda_layer_by_layer_from_the_command_line(tiny_dir, data_dir, tmp_path, capsys):
    common = ["--model", tiny_dir, "--data-dir", data_dir, "--calib-per-task", 2, "--subsets", 2, "--max-length", 32,
              "--method", "wanda", "--sparsity", 0.5, "--device", "cpu"]
    assert main([str(a) for a in ["prune", *common, "--out", tmp_path / "a"]]) == 0
    assert main([str(a) for a in ["prune", *common, "--execution-device", "cpu", "--out", tmp_path / "b"]]) == 0
    a, b = load_model(str(tmp_path / "a"), device="cpu"), load_model(str(tmp_path / "b"), device="cpu")
    assert a.fingerprint == b.fingerprint  # same masks layer by layer
    line = one_error_line(["prune", *common, "--execution-device", "bogus", "--out", tmp_path / "c"], capsys)
    assert "--execution-device" in line and "bogus" in line


@pytest.mark.slow  # a fresh interpreter: about 3 s
def test_the_cli_runs_as_a_module_as_torchrun_launches_it():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "cap_lab.cli", "score", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--dist-timeout-min" in out.stdout, out.stderr


def test_plan_is_a_sub_command(capsys, no_load):
    assert main(["plan", "--model", "llama-3-8b", "--assume-length", "64", "--calib-per-task", "2", "--subsets", "2"]) == 0
    out = capsys.readouterr().out
    assert all(method in out for method in ("reference", "exact", "attribution")) and "llama-3-8b" in out
