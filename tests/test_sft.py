"""Causal-LM fine-tuning data: prompts, response-only labels, padding, truncation, evaluation, generation.

The byte-level tokenizer of the tiny decoder maps each character to one token (id = byte's slot +
3), so expected token positions can be written down by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlora.results.generations import log_generations, read_generations, truncate_generations
from fedlora.runtime.models import AdapterHost, ModelSettings
from fedlora.runtime.tasks import CausalLMTask, GenerationPrompt, TaskSettings
from fedlora.runtime.tiny_decoder import build_tiny_tokenizer
from fedlora.runtime.training import sft

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return build_tiny_tokenizer()


def ids(tok, text: str) -> list[int]:  # noqa: ANN001
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_is_one_token_per_byte_and_round_trips(tok) -> None:  # noqa: ANN001
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    assert len(tok) == 259
    text = "Add 12 + 7 = 19. Ünïcode ✓\n"
    assert len(ids(tok, text)) == len(text.encode("utf-8"))
    assert tok.decode(ids(tok, text)) == text


def test_prompt_template_with_and_without_input() -> None:
    template = sft.PromptTemplate()
    expected = "### Instruction:\nReverse.\n\n### Input:\na b\n\n### Response:\n"
    assert template.render("Reverse.", "a b") == expected
    assert template.render("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert template.render("Say hi.", "  \n") == template.render("Say hi.")  # a blank input is no input
    custom = sft.PromptTemplate("Q: {instruction} [{input}] A:", "Q: {instruction} A:")
    assert custom.render("x", "y") == "Q: x [y] A:" and custom.render("x") == "Q: x A:"


def test_template_problems() -> None:
    both = {"instruction", "input"}
    assert sft.template_problems(sft.DEFAULT_WITH_INPUT, both, both) is None
    assert "must contain {input}" in sft.template_problems("{instruction}", both, both)
    assert "unknown field(s) ['context']" in sft.template_problems("{instruction} {context}", both, both)
    assert "not a valid format string" in sft.template_problems("{instruction", both, both)


def test_labels_cover_exactly_the_response_and_eos(tok) -> None:  # noqa: ANN001
    input_ids, labels, cut = sft.encode_example(tok, "ab", "cd", max_length=64)
    a, b, c, d = ids(tok, "abcd")
    assert input_ids == [BOS, a, b, c, d, EOS]
    assert labels == [-100, -100, -100, c, d, EOS]  # BOS and the prompt never count in the loss
    assert not cut


def test_truncation_keeps_prompt_head_and_tail_and_some_response(tok) -> None:  # noqa: ANN001
    # fit_to_length on plain integers: the prompt keeps max(L - len(resp), L // 2) tokens
    prompt, response = list(range(100, 120)), list(range(10))  # 20 + 10 > 16
    p, r = sft.fit_to_length(prompt, response, 16)
    assert p == [100, 101, 102, 103, 116, 117, 118, 119] and r == list(range(8))  # 8 = 16 // 2 each
    p, r = sft.fit_to_length(list(range(100, 120)), [1, 2], 16)  # short response: all of it kept
    assert p == [*range(100, 107), *range(113, 120)] and r == [1, 2]
    assert sft.fit_to_length([1, 2], [3], 16) == ([1, 2], [3])
    input_ids, labels, cut = sft.encode_example(tok, "x" * 40, "y" * 40, max_length=32)
    assert cut and len(input_ids) == len(labels) == 32
    assert input_ids[0] == BOS and input_ids[15] == ids(tok, "x")[0]
    assert labels[:16] == [-100] * 16 and labels[16:] == ids(tok, "y" * 16)  # EOS cut with the response


def test_right_padding_for_training_batches(tok) -> None:  # noqa: ANN001
    examples = [sft.encode_example(tok, "ab", "c", 64)[:2], sft.encode_example(tok, "abcd", "efg", 64)[:2]]
    enc = sft.SFTEncoded.from_examples(examples, PAD)
    assert enc.input_ids.shape == (2, 9)  # BOS + 4 + 3 + EOS
    assert enc.input_ids[0].tolist()[5:] == [PAD] * 4 and enc.attention_mask[0].tolist() == [1] * 5 + [0] * 4
    c = ids(tok, "c")[0]
    assert enc.labels[0].tolist() == [-100, -100, -100, c, EOS] + [-100] * 4  # padding is never labelled
    batch = enc.batch([0])  # trimmed to its own longest sequence
    assert batch["input_ids"].tolist() == [[BOS, *ids(tok, "ab"), c, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, -100, c, EOS]]
    assert enc.batch([0, 1])["input_ids"].shape == (2, 9)


def test_left_padding_for_generation() -> None:
    input_ids, mask = sft.left_pad([[5, 6, 7], [8]], PAD)
    assert input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def tiny() -> tuple[AdapterHost, CausalLMTask]:
    settings = ModelSettings(name="tiny-random-llama", target_modules=("q_proj", "v_proj"), decoder=True,
                             max_length=64)
    host = AdapterHost(settings, 0, seed=0)
    task = CausalLMTask(TaskSettings(kind="causal_lm", max_new_tokens=6))
    task.tokenizer = build_tiny_tokenizer()
    task.max_length = 64
    return host, task


def _encoded(tok, pairs: list[tuple[str, str]]) -> sft.SFTEncoded:  # noqa: ANN001
    return sft.SFTEncoded.from_examples([sft.encode_example(tok, p, r, 64)[:2] for p, r in pairs], PAD)


def test_held_out_loss_is_the_mean_over_response_tokens_and_perplexity_its_exp(tiny) -> None:  # noqa: ANN001
    host, task = tiny
    pairs = [("### Instruction:\nAdd.\n\n### Response:\n", "12"), ("Q", "a longer answer"), ("xyz", "k")]
    data = _encoded(task.tokenizer, pairs)
    metrics = task.evaluate(host.model, data, [0, 1, 2], batch_size=2)
    assert metrics["test_tokens"] == (2 + 1) + (15 + 1) + (1 + 1)  # response tokens + EOS each
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-12)
    # the same number token by token, one example at a time, straight from the logits
    total = 0.0
    for i in range(3):
        b = data.batch([i])
        with torch.no_grad():
            logp = torch.log_softmax(host.model(input_ids=b["input_ids"]).logits[0].double(), dim=-1)
        for t in range(1, b["input_ids"].shape[1]):
            if b["labels"][0, t] != -100:
                total -= float(logp[t - 1, b["labels"][0, t]])
    assert metrics["test_loss"] == pytest.approx(total / metrics["test_tokens"], rel=1e-5)
    assert task.evaluate(host.model, data, [0, 1, 2], batch_size=1)["test_loss"] == pytest.approx(
        metrics["test_loss"], rel=1e-6)  # padding never counts: the batch size does not matter


def test_training_loss_is_the_same_response_token_mean(tiny) -> None:  # noqa: ANN001
    host, task = tiny
    data = _encoded(task.tokenizer, [("abc", "de"), ("a", "fghij")])
    with torch.no_grad():
        hf_loss = float(host.model(**data.batch([0, 1])).loss)  # what train_steps minimises
    ours = task.evaluate(host.model, data, [0, 1], batch_size=2)["test_loss"]
    assert hf_loss == pytest.approx(ours, rel=1e-5)


def test_only_the_positions_predicting_the_response_get_a_gradient(tiny) -> None:  # noqa: ANN001
    host, task = tiny
    batch = _encoded(task.tokenizer, [("abc", "de"), ("a", "fghij")]).batch([0, 1])
    host.set_trainable(1, True)  # the active adapter, so that the logits carry a graph
    out = host.model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    host.model.zero_grad(set_to_none=True)
    touched = (out.logits.grad.abs().sum(dim=-1) > 0).int().tolist()
    # row 0: BOS a b c | d e EOS -> positions 3, 4, 5 predict d, e, EOS; row 1: BOS a | f g h i j EOS + pad
    assert touched == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]]


def test_batched_left_padded_generation_equals_one_by_one(tiny) -> None:  # noqa: ANN001
    host, task = tiny
    prompts = [GenerationPrompt(i, text, "ref", "cat", tuple(sft.encode_prompt(task.tokenizer, text, 64)))
               for i, text in enumerate(["### Instruction:\nHi.\n\n### Response:\n", "x", "a b c d e f"])]
    together = task.generate(host.model, prompts)
    alone = [task.generate(host.model, [p])[0] for p in prompts]
    assert [r["output"] for r in together] == [r["output"] for r in alone]
    assert together[0]["prompt"] == prompts[0].prompt and together[0]["reference"] == "ref"
    assert all(len(r["output"]) <= 6 for r in together)  # max_new_tokens=6, one byte per token


def test_generation_prompts_take_the_categories_in_turn() -> None:
    from fedlora.runtime.data.instructions import Instruction

    task = CausalLMTask(TaskSettings(kind="causal_lm", num_generations=4))
    task.tokenizer, task.max_length = build_tiny_tokenizer(), 64
    task.records = tuple(Instruction(f"i{k}", "", f"o{k}", cat) for k, cat in enumerate("aabbbcc"))
    chosen = [p.index for p in task.generation_prompts([0, 1, 2, 3, 4, 5, 6])]
    assert chosen == [0, 2, 5, 1]


def test_generations_are_written_per_round_and_truncated_on_resume(tmp_path: Path) -> None:
    row = {"example": 7, "category": "copy", "prompt": "### Instruction:\nRepeat.\n", "reference": "a|b",
           "output": "a\nb"}
    log_generations(tmp_path, 0, [row])
    log_generations(tmp_path, 1, [dict(row, output="")])
    log_generations(tmp_path, 2, [dict(row, output="a|b\x0f")])
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2] and json.loads(lines[0])["output"] == "a\nb"
    md = (tmp_path / "generations.md").read_text()
    assert "## Example 7 (copy)" in md and "Reference: a\\|b" in md
    assert "| 0 | a<br>b |" in md and "| 1 | *(empty)* |" in md and "| 2 | a\\|b\\x0f |" in md
    truncate_generations(tmp_path, 1)
    assert [r["round"] for r in read_generations(tmp_path)] == [0, 1]
    assert "| 2 |" not in (tmp_path / "generations.md").read_text()
