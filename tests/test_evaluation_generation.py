"""Batched greedy decoding equals unbatched decoding, stops where it should, and matches transformers."""
import pytest
import torch

from cap_lab.evaluation.generation import common_prefix_length, generate_greedy, stop_token_ids
from cap_lab.models import tiny_random_model, tiny_tokenizer

INSTRUCTION = "Answer briefly.\nQ: "  # a shared prefix, as the system prompt and instruction of real prompts
TEXTS = [INSTRUCTION + q for q in ("Hi", "What is two plus three?", "x" * 37, "Why?")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _prompts(tokenizer):
    return [tokenizer(t)["input_ids"] for t in TEXTS]  # lengths 21 .. 56 with BOS, 18 shared


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_batched_equals_unbatched(arch):
    lm = tiny_random_model(arch, seed=1)
    prompts = _prompts(lm.tokenizer)
    kw = dict(max_new_tokens=8, stop_ids=(2,), pad_id=0)
    single = [generate_greedy(lm.model, [p], **kw)[0] for p in prompts]
    batched = generate_greedy(lm.model, prompts, batch_size=len(prompts), **kw)  # shared prefix run once
    pairs = generate_greedy(lm.model, prompts, batch_size=2, **kw)  # prefix cache reused by two batches
    unshared = generate_greedy(lm.model, prompts, batch_size=len(prompts), share_prefix=False, **kw)
    assert [g.tokens for g in batched] == [g.tokens for g in single] == [g.tokens for g in pairs]
    assert batched == unshared and [g.stopped for g in batched] == [g.stopped for g in single]


def test_common_prefix_length_leaves_every_prompt_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert common_prefix_length([[7, 2], [1, 2]]) == 0


def test_rows_stop_at_a_stop_token_and_the_rest_continue():
    lm = tiny_random_model("llama", seed=2)
    prompts = _prompts(lm.tokenizer)
    free = generate_greedy(lm.model, prompts, max_new_tokens=10, stop_ids=(), pad_id=0)
    assert all(len(g.tokens) == 10 and g.truncated for g in free)
    stop = free[1].tokens[3]  # row 1 stops by its 4th token; other rows where (if) that token appears
    stopped = generate_greedy(lm.model, prompts, max_new_tokens=10, stop_ids=(stop,), pad_id=0)
    single = [generate_greedy(lm.model, [p], max_new_tokens=10, stop_ids=(stop,), pad_id=0)[0] for p in prompts]
    assert stopped == single
    assert stopped[1].stopped == "stop" and len(stopped[1].tokens) <= 3
    assert any(g.stopped == "length" for g in stopped), "pick a seed where some row runs to the limit"
    for g, f in zip(stopped, free):  # every row is the free row cut before its first stop token
        cut = f.tokens.index(stop) if stop in f.tokens else len(f.tokens)
        assert g.tokens == f.tokens[:cut] and g.stopped == ("stop" if stop in f.tokens else "length")


def test_matches_transformers_generate():
    lm = tiny_random_model("mistral", seed=3)
    prompt = _prompts(lm.tokenizer)[1]  # "What is two plus three?"
    [ours] = generate_greedy(lm.model, [prompt], max_new_tokens=8, stop_ids=(), pad_id=0)
    reference = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=0, eos_token_id=None)
    assert ours.tokens == reference[0, len(prompt):].tolist()


def test_stop_token_ids_include_the_end_of_turn_token():
    tok = tiny_tokenizer()
    assert stop_token_ids(tok) == (2,)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert stop_token_ids(tok) == (2, tok.convert_tokens_to_ids("<|im_end|>"))


def test_generate_greedy_rejects_bad_arguments():
    lm = tiny_random_model("llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(lm.model, [[1, 5]], max_new_tokens=0, stop_ids=(2,), pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy(lm.model, [[]], max_new_tokens=4, stop_ids=(2,), pad_id=0)
