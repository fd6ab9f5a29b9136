"""Scoring on 2 gloo ranks (spawned processes, the torchrun code path): same scores, one cache entry, resume.

Each worker does what ``torchrun -m cap_lab.cli score`` does on one rank: sets the torchrun
environment, :func:`cap_lab.distributed.init_from_env`, loads the saved tiny model, builds the
calibration set and calls :func:`cap_lab.scoring.head_scores` with a cache folder shared by the
ranks. Only 127.0.0.1 is used.
"""
import multiprocessing
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from cap_lab import distributed
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.models import load_model, tiny_random_model
from cap_lab.scoring import exact, head_scores, progress_dir, score_payload
from cap_lab.scoring.api import scores_root

CONFIG = CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32)
TIMEOUT_S = 120  # per spawned run; a hang fails the test instead of blocking CI


# ------------------------------------------------------------------ one rank (runs in a spawned process)
def _rank_main(rank: int, port: int, model_dir: str, data_dir: str, cache: str, out: str, methods: tuple,
               fail_at_layer: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    scored: list[int] = []
    real = exact._score_layer

    def tracked(model, layout, layer, *args):  # records the layers this rank scores; may die before one
        if layer == fail_at_layer:
            raise RuntimeError(f"rank {rank} killed before layer {layer}")
        scored.append(layer)
        return real(model, layout, layer, *args)

    exact._score_layer = tracked
    try:
        assert distributed.init_from_env("cpu", timeout=timedelta(seconds=60)) == "cpu"
        lm = load_model(model_dir, device="cpu")
        calib = build_calibration_set(lm.tokenizer, CONFIG, data_dir)
        results = {m: head_scores(lm, calib, method=m, progress=False, cache_dir=cache) for m in methods}
        torch.save({"scored": scored, "results": {m: (r.masked_losses, r.intact_losses, r.scores, r.settings)
                                                  for m, r in results.items()}}, Path(out) / f"rank{rank}.pt")
        distributed.close()
        assert distributed.world() == (0, 1)
    except BaseException:
        torch.save({"scored": scored, "error": traceback.format_exc()}, Path(out) / f"rank{rank}.pt")
        raise SystemExit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(out: Path, *args, fail: dict[int, int] | None = None) -> list[dict]:
    """Spawn ranks 0 and 1 (``fail``: rank -> layer it dies before); their saved outcomes and exit codes."""
    out.mkdir(parents=True)
    ctx, port = multiprocessing.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, *map(str, args[:3]), str(out), *args[3:],
                                                   (fail or {}).get(r))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank {procs.index(p)} still running after {TIMEOUT_S} s: a rank hangs")
    return [dict(torch.load(out / f"rank{r}.pt", weights_only=False), exitcode=p.exitcode) for r, p in enumerate(procs)]


@pytest.fixture
def saved_model(tmp_path):
    lm = tiny_random_model("llama", seed=0)  # 3 layers, 4 heads
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def one_process(model_dir, data_dir, method, cache):
    lm = load_model(str(model_dir), device="cpu")
    calib = build_calibration_set(lm.tokenizer, CONFIG, str(data_dir))
    return lm, calib, head_scores(lm, calib, method=method, progress=False, cache_dir=cache)


# ------------------------------------------------------------------ tests
def test_my_share_is_a_balanced_partition():
    assert distributed.my_share(range(6), 0, 2) == [0, 3, 4] and distributed.my_share(range(6), 1, 2) == [1, 2, 5]
    shares = [distributed.my_share(range(10), r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))
    cost = [sum(10 - l for l in s) for s in shares]  # layer l costs ~ L - l
    assert max(cost) - min(cost) <= 10
    assert distributed.my_share(["a"], 0, 1) == ["a"]
    with pytest.raises(ValueError, match="rank=2"):
        distributed.my_share(range(3), 2, 2)


def test_without_torchrun_everything_is_one_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == "cpu" and distributed.world() == (0, 1)
    t = torch.ones(3)
    assert distributed.sum_across_ranks(t) is t and torch.equal(t, torch.ones(3))
    assert distributed.all_true(True) and not distributed.all_true(False)
    distributed.barrier()
    distributed.check_same_on_all_ranks("anything", {"a": 1})
    distributed.close()


def test_close_leaves_a_group_the_caller_made(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.init_from_env("cpu") == "cpu"  # already initialized: joins nothing
        distributed.close()
        assert dist.is_initialized()  # the caller's group is the caller's to destroy
    finally:
        dist.destroy_process_group()


def test_resume_scores_only_the_missing_layers_in_any_order(tiny, data_dir, monkeypatch, tmp_path, one_thread):
    """Progress of layer 1 alone (as another rank leaves it) is used; layers 0 and 2 are scored."""
    calib = build_calibration_set(tiny.tokenizer, CONFIG, data_dir)
    folder = tmp_path / "p"
    whole = exact.score_heads_exact(tiny.model, calib, checkpoint_dir=folder, progress=False)
    (folder / "layer_0000.safetensors").write_bytes(b"")  # damaged: recomputed
    (folder / "layer_0002.safetensors").unlink()
    real, scored = exact._score_layer, []

    def tracked(model, layout, layer, *args):
        scored.append(layer)
        return real(model, layout, layer, *args)

    monkeypatch.setattr(exact, "_score_layer", tracked)
    resumed = exact.score_heads_exact(tiny.model, calib, checkpoint_dir=folder, progress=False)
    assert scored == [0, 2] and resumed.settings["resumed_layers"] == [1]
    assert torch.equal(resumed.masked_losses, whole.masked_losses) and torch.equal(resumed.scores, whole.scores)


def test_reference_refuses_several_ranks(tiny, data_dir, monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    calib = build_calibration_set(tiny.tokenizer, CONFIG, data_dir)
    with pytest.raises(ValueError, match="'reference' runs in one process"):
        head_scores(tiny, calib, method="reference", progress=False)


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_scores_and_cache_entry(saved_model, data_dir, tmp_path, one_thread):
    shared = tmp_path / "shared_cache"
    ranks = run_two_ranks(tmp_path / "out", saved_model, data_dir, shared, ("exact", "attribution"))
    assert [r["exitcode"] for r in ranks] == [0, 0], [r.get("error") for r in ranks]
    assert sorted(ranks[0]["scored"] + ranks[1]["scored"]) == [0, 1, 2]  # each layer scored once
    assert ranks[0]["scored"] == [0] and ranks[1]["scored"] == [1, 2]  # snake share of 3 layers
    for method in ("exact", "attribution"):
        lm, calib, single = one_process(saved_model, data_dir, method, tmp_path / "single_cache")
        for rank in ranks:
            masked, intact, scores, settings = rank["results"][method]
            assert settings["ranks"] == 2 and settings["key"] == single.settings["key"]
            torch.testing.assert_close(masked, single.masked_losses, atol=1e-6, rtol=0)
            torch.testing.assert_close(intact, single.intact_losses, atol=1e-6, rtol=0)
            torch.testing.assert_close(scores, single.scores, atol=1e-6, rtol=0)
        assert torch.equal(ranks[0]["results"][method][2], ranks[1]["results"][method][2])  # same on every rank
        payload = score_payload(lm.identity(), calib, method)
        assert not progress_dir(payload, shared).exists()
        hit = head_scores(lm, calib, method=method, progress=False, cache_dir=shared)  # served from the one entry
        assert hit.settings["path"] == ranks[0]["results"][method][3]["path"] and hit.settings["ranks"] == 2
        assert torch.equal(hit.masked_losses, ranks[0]["results"][method][0])
    assert len([p for p in scores_root(shared).iterdir() if not p.name.startswith(".")]) == 2  # one per method


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_and_a_rerun_scores_only_the_missing_layers(saved_model, data_dir, tmp_path,
                                                                              one_thread):
    shared = tmp_path / "shared_cache"
    failed = run_two_ranks(tmp_path / "run1", saved_model, data_dir, shared, ("exact",), fail={1: 2})
    assert [r["exitcode"] for r in failed] == [1, 1]  # rank 1 died; rank 0 failed at the barrier, did not hang
    assert "killed before layer 2" in failed[1]["error"]
    assert "monitoredBarrier" in failed[0]["error"] and "1" in failed[0]["error"], failed[0]["error"]
    assert failed[0]["scored"] == [0] and failed[1]["scored"] == [1]
    lm = load_model(str(saved_model), device="cpu")
    calib = build_calibration_set(lm.tokenizer, CONFIG, str(data_dir))
    folder = progress_dir(score_payload(lm.identity(), calib, "exact"), shared)
    assert sorted(p.name for p in folder.glob("layer_*")) == ["layer_0000.safetensors", "layer_0001.safetensors"]

    resumed = run_two_ranks(tmp_path / "run2", saved_model, data_dir, shared, ("exact",))
    assert [r["exitcode"] for r in resumed] == [0, 0], [r.get("error") for r in resumed]
    assert resumed[0]["scored"] == [2] and resumed[1]["scored"] == []  # only the missing layer
    _, _, single = one_process(saved_model, data_dir, "exact", tmp_path / "single_cache")
    for rank in resumed:
        masked, _, scores, settings = rank["results"]["exact"]
        assert settings["resumed_layers"] == [0, 1]
        torch.testing.assert_close(masked, single.masked_losses, atol=1e-6, rtol=0)
        torch.testing.assert_close(scores, single.scores, atol=1e-6, rtol=0)
    assert not folder.exists()
