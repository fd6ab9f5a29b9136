"""Perplexity and log-likelihood scoring on tiny models with known answers."""
import math

import pytest
import torch
from torch import nn

from cap_lab.data import Example
from cap_lab.evaluation.loglik import continuation_logprobs, loglik_accuracy, option_logprobs
from cap_lab.evaluation.perplexity import perplexity_from_nll, token_windows, tokenize_corpus, wikitext2_perplexity
from cap_lab.evaluation.settings import EvalSettings
from cap_lab.models import tiny_random_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def unigram_model(preferred: dict[str, float], seed: int = 0):
    """A tiny llama whose next-token logits ignore the input: zero head weights plus a bias.

    ``preferred`` maps characters to their logit; every other token gets logit 0.
    """
    lm = tiny_random_model("llama", seed=seed)
    head = nn.Linear(lm.model.config.hidden_size, lm.model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for char, logit in preferred.items():
            head.bias[lm.tokenizer.convert_tokens_to_ids(char)] = logit
    lm.model.lm_head = head
    return lm


def unigram_logprob(lm, text: str) -> float:
    bias = lm.model.lm_head.bias.detach().double()
    logp = bias - torch.logsumexp(bias, 0)
    return float(sum(logp[lm.tokenizer.convert_tokens_to_ids(c)] for c in text))


def test_token_windows_drop_the_tail():
    ids = torch.arange(50)
    windows = token_windows(ids, 16)
    assert windows.shape == (3, 16) and windows[2, -1] == 47  # tokens 48, 49 dropped
    assert token_windows(ids, 16, n_windows=2).tolist() == ids[:32].view(2, 16).tolist()
    assert token_windows(ids, 16, n_windows=10).shape == (3, 16)
    with pytest.raises(ValueError, match="no complete window"):
        token_windows(ids, 64)
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(ids, 1)


def test_corpus_is_tokenized_once_with_special_tokens():
    tok = tiny_tokenizer()
    text = "= Robert =\n\n" * 40  # 480 characters
    ids = tokenize_corpus(tok, text)
    assert ids.numel() == len(text) + 1 and ids[0] == tok.bos_token_id  # char-level plus BOS
    assert token_windows(ids, 100).shape == (4, 100)  # 481 tokens: 4 windows, 81 dropped


def wikitext_dir(root, text: str):
    """A data folder whose WikiText-2 test file holds ``text``."""
    (root / "wikitext2_raw").mkdir(parents=True)
    (root / "wikitext2_raw" / "wiki.test.raw").write_text(text)
    return root


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary(tmp_path):
    lm = tiny_random_model("llama")
    with torch.no_grad():
        lm.model.lm_head.weight.zero_()  # logits 0 everywhere: uniform over 112 tokens
    result = wikitext2_perplexity(lm, EvalSettings(ppl_seqlen=32, ppl_windows=3),
                                  data_dir=wikitext_dir(tmp_path / "data", "The quick brown fox. " * 20),
                                  out_dir=tmp_path, progress=False)
    assert math.isclose(result.value, lm.model.config.vocab_size, rel_tol=1e-5)
    assert result.details["n_tokens"] == 96 and result.details["n_predictions"] == 93 and result.n == 3
    assert result.details["seqlen"] == 32 and result.metric == "perplexity"


def test_perplexity_is_capped_by_the_context_and_matches_the_model_loss(tmp_path):
    lm = tiny_random_model("qwen2", seed=4, max_position_embeddings=24)
    text = "Valkyria Chronicles III is a tactical role-playing game. " * 3
    result = wikitext2_perplexity(lm, EvalSettings(ppl_seqlen=2048, ppl_windows=None),
                                  data_dir=wikitext_dir(tmp_path / "data", text), out_dir=tmp_path, progress=False)
    assert result.details["seqlen"] == 24 and result.details["requested_seqlen"] == 2048
    windows = token_windows(tokenize_corpus(lm.tokenizer, text), 24)
    with torch.inference_mode():
        losses = [float(lm.model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert math.isclose(result.value, math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


def test_perplexity_interval_needs_two_windows():
    value, low, high = perplexity_from_nll(torch.tensor([10.0]), 10)
    assert math.isclose(value, math.e) and low is None and high is None
    value, low, high = perplexity_from_nll(torch.tensor([10.0, 20.0]), 10)
    assert low < value < high


def test_continuation_logprobs_are_exact_and_independent_of_batching():
    lm = unigram_model({"n": 3.0, "o": 2.0, "y": 0.5})
    tok = lm.tokenizer
    contexts = [tok("Is it?")["input_ids"], tok("A much longer question here?")["input_ids"]] * 2
    texts = ["no", "yes", "yes", "no"]
    continuations = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    one = continuation_logprobs(lm.model, contexts, continuations, batch_size=1)
    four = continuation_logprobs(lm.model, contexts, continuations, batch_size=4)
    assert one == pytest.approx(four, abs=1e-5)
    assert one == pytest.approx([unigram_logprob(lm, t) for t in texts], abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding window 6 < the contexts
def test_shared_prompt_scoring_equals_scoring_each_concatenation(arch):
    lm = tiny_random_model(arch, seed=6)
    tok = lm.tokenizer
    questions = ("Is the sky blue?", "Which one?", "What do plants need to grow?")
    contexts = [tok("Answer the question.\nQ: " + q)["input_ids"] for q in questions]  # 24 tokens shared
    options = [[tok(t, add_special_tokens=False)["input_ids"] for t in texts]
               for texts in (["Yes", "No"], ["a", "bb", "ccc", "dddd", "e"], ["light", "sound", "x"])]
    fast = option_logprobs(lm.model, contexts, options, batch_size=2)
    unshared = option_logprobs(lm.model, contexts, options, batch_size=3, share_prefix=False)
    flat_ctx = [c for c, opts in zip(contexts, options) for _ in opts]
    slow = continuation_logprobs(lm.model, flat_ctx, [o for opts in options for o in opts], batch_size=3)
    assert [len(f) for f in fast] == [2, 5, 3]
    assert [x for f in fast for x in f] == pytest.approx(slow, abs=1e-4)
    assert [x for f in unshared for x in f] == pytest.approx(slow, abs=1e-4)


def test_loglik_picks_the_option_the_model_is_forced_to_prefer(tmp_path):
    lm = unigram_model({"N": 4.0, "o": 4.0})  # "No" is far likelier than "Yes"
    questions = [Example("strategyqa", f"q{i}", q, gold) for i, (q, gold) in
                 enumerate([("Can a fish climb?", "no"), ("Is water wet?", "yes"), ("Do cats bark?", "no")])]
    result = loglik_accuracy(lm, "strategyqa", examples=questions, out_dir=tmp_path, progress=False)
    assert result.value == pytest.approx(2 / 3) and result.n == 3 and result.metric == "loglik_accuracy"
    assert result.ci_low < 2 / 3 < result.ci_high


def test_length_normalization_removes_the_short_option_bias(tmp_path):
    # p(a) > p(b) per character, but "aaaa" as a whole is less likely than "b"
    lm = unigram_model({"a": 5.0, "b": 4.0})
    arc = [Example("arc_challenge", "arc-0", "Pick one.", "A", choices=(("A", "aaaa"), ("B", "b")))]
    result = loglik_accuracy(lm, "arc_challenge", examples=arc, out_dir=tmp_path, progress=False)
    assert result.value == 0.0 and result.details["loglik_accuracy_norm"] == 1.0


def test_loglik_rejects_generation_only_tasks():
    with pytest.raises(ValueError, match="strategyqa, arc_challenge"):
        loglik_accuracy(tiny_random_model("llama"), "gsm8k", examples=[])
