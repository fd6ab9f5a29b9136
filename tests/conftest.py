"""Shared fixtures: tiny random models, a small hand-written data dir, an isolated cache."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cap_lab.models import tiny_random_model

REAL_DATA = os.environ.get("CAP_LAB_DATA")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own score/result cache; the real model cache is kept shared."""
    real = os.environ.get("CAP_LAB_CACHE") or str(Path.home() / ".cache" / "cap_lab")
    monkeypatch.setenv("CAP_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    models = Path(real) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "models").symlink_to(models, target_is_directory=True)
    yield


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound: one torch thread is faster and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return tiny_random_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The ``tiny`` model (3 layers x 4 heads) saved as a local model folder; read-only."""
    lm = tiny_random_model("llama", seed=0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _gsm(i: int) -> dict:
    a, b = 3 + i, 4 + 2 * i
    return {"question": f"Tom has {a} apples and buys {b} more{' today' * (i % 4)}. How many apples does he have?",
            "answer": f"Tom starts with {a} apples.\nHe buys {b} more, so {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}


def _arc(i: int, split: str) -> dict:
    labels = ["A", "B", "C", "D"] if i % 5 else ["1", "2", "3", "4"]
    return {"id": f"arc-{split}-{i}",
            "question": {"stem": f"Which object {split} {i} is the heaviest{' of all' * (i % 4)}?",
                         "choices": [{"label": l, "text": f"object {k} of {i}"} for k, l in enumerate(labels)]},
            "answerKey": labels[i % 4]}


def _sqa(i: int, split: str) -> dict:
    return {"qid": f"sqa-{split}-{i}", "term": "t", "description": "d",
            "question": f"Is the number {i} in {split} larger than {i % 7}{' indeed' * (i % 4)}?",
            "answer": bool(i % 2), "facts": [f"{i} is a number.", f"{i % 7} is smaller than 7."],
            "decomposition": []}


def write_data_dir(root: Path, n_train: int = 16, n_eval: int = 6) -> Path:
    """A small data dir with the real layout and formats; examples written for these tests."""
    (root / "gsm8k").mkdir(parents=True)
    (root / "arc_challenge").mkdir()
    (root / "strategyqa").mkdir()
    (root / "wikitext2_raw").mkdir()
    (root / "gsm8k/train.jsonl").write_text("".join(json.dumps(_gsm(i)) + "\n" for i in range(n_train)))
    (root / "gsm8k/test.jsonl").write_text("".join(json.dumps(_gsm(100 + i)) + "\n" for i in range(n_eval)))
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        (root / f"arc_challenge/{split}.jsonl").write_text("".join(json.dumps(_arc(i, split)) + "\n" for i in range(n)))
    (root / "strategyqa/train.json").write_text(json.dumps([_sqa(i, "train") for i in range(n_train)]))
    (root / "strategyqa/dev.json").write_text(json.dumps([_sqa(i, "dev") for i in range(n_eval)]))
    lines = [" \n", " = Heading = \n", " \n"] + [f" The sentence number {i} is here . \n" for i in range(40)]
    (root / "wikitext2_raw/wiki.test.raw").write_text("".join(lines))
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture
def real_data_dir() -> Path:
    if not REAL_DATA:
        pytest.skip("CAP_LAB_DATA is not set")
    return Path(REAL_DATA)


def spy_on_onloaders(monkeypatch) -> list:
    """Keep every onloader that cap_lab.pruning opens (layer-by-layer execution)."""
    import cap_lab.pruning as pruning

    onloaders, real = [], pruning.onload_layers

    @contextmanager
    def spy(*args, **kwargs):
        with real(*args, **kwargs) as onloader:
            onloaders.append(onloader)
            yield onloader

    monkeypatch.setattr(pruning, "onload_layers", spy)
    return onloaders


def obvious_obs_start(weight: torch.Tensor, hessian: torch.Tensor, damping: float):
    """The float64 start of an obvious SparseGPT/OBS loop, as the reference prepares it.

    Dead inputs (H_cc = 0) get H_cc = 1 and a zero weight column; the diagonal is damped by
    ``damping`` times its mean. Returns the weight copy (rows, cols) and, for every column c, the
    explicit inverse of H[c:, c:] (the Hessian of the columns not yet fixed).
    """
    w, h = weight.double().clone(), hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return w, [torch.linalg.inv(h[c:, c:]) for c in range(h.shape[0])]


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pytest_report_header(config):
    """Which end of the supported range this run tests (pinned set or newest releases)."""
    import transformers

    return f"cap_lab tested with transformers {transformers.__version__}, torch {torch.__version__}"


@dataclass(frozen=True)
class FakeResult:
    """What the sweep reads of an EvalResult."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int

    def outcomes(self) -> dict:
        return {f"q{i}": int(i < round(self.value * self.n)) for i in range(self.n)}


def fake_evaluate(calls: list):
    """A stand-in for cap_lab.evaluation.evaluate whose value depends on the weights."""

    def evaluate(lm, tasks, settings, **kwargs):
        calls.append((tuple(tasks), settings.mode))
        zeros = sum(float((p == 0).float().mean()) for p in lm.model.parameters()) / len(list(lm.model.parameters()))
        out = {}
        for t in tasks:
            v = 1.0 + 10 * zeros if t == "wikitext2" else 0.5 - zeros / 2
            out[t] = FakeResult("ppl" if t == "wikitext2" else "accuracy", v, v * 0.9, v * 1.1, 3)
        return out

    return evaluate


def subset_mean_target_losses(model, calib) -> torch.Tensor:
    """(K,) token-mean target CE per subset from full logits, the obvious way."""
    total, count = torch.zeros(calib.config.n_subsets, dtype=torch.float64), torch.zeros(calib.config.n_subsets)
    for batch in calib.batches(list(range(len(calib.items))), 9):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.labels[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(dim=1)
        subset = torch.tensor([calib.items[i].subset for i in batch.items])
        total = total.index_add(0, subset, ce.double())
        count = count.index_add(0, subset, (labels != -100).sum(dim=1).float())
    return total / count
