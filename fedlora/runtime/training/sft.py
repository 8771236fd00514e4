"""Supervised fine-tuning data for causal LMs: prompts, response-only labels, padding, truncation.

An example is ``[BOS] prompt response EOS``. The labels copy the token ids of ``response EOS`` and
are ``-100`` (ignored by the cross-entropy) on the prompt, the BOS and the padding, so the loss
measures only how well the model writes the response. Training batches are right-padded (the
causal mask then never lets a real token attend to padding); generation batches are left-padded,
so that every prompt ends at the last position and new tokens continue it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that do not count in the loss (PyTorch's cross-entropy default)

# An Alpaca-style layout (section headers, no preamble: fewer tokens for the byte-level demo model).
DEFAULT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
DEFAULT_WITHOUT_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class PromptTemplate:
    """Two ``str.format`` templates: with ``{instruction}`` and ``{input}``; with ``{instruction}`` only."""

    with_input: str = DEFAULT_WITH_INPUT
    without_input: str = DEFAULT_WITHOUT_INPUT

    def render(self, instruction: str, input_text: str = "") -> str:
        """The prompt of one example; an empty (or blank) input uses the template without input."""
        if input_text.strip():
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)


def template_problems(template: str, allowed: set[str], required: set[str]) -> str | None:
    """Why ``template`` is not usable (unknown or missing ``{fields}``, bad braces), or ``None``."""
    import string  # noqa: PLC0415

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a valid format string ({exc}); write literal braces as {{{{ and }}}}"
    unknown, missing = sorted(fields - allowed), sorted(required - fields)
    if unknown:
        return f"unknown field(s) {unknown}; the fields are {sorted(allowed)}"
    if missing:
        return f"must contain {', '.join('{' + m + '}' for m in missing)}"
    return None


def fit_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + response`` to ``max_length`` tokens; both keep at least a share.

    The prompt keeps ``max(max_length - len(response), max_length // 2)`` tokens (all of it when it
    fits): its head (instruction) and its tail (the response header), dropping the middle (usually
    a long input); the response is then cut at the end to fill what is left. So an example always
    has response tokens to learn from, and its prompt still ends with the template's response header.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = min(len(prompt), max(max_length - len(response), max_length // 2))
    head = keep // 2
    prompt = prompt[:head] + prompt[len(prompt) - (keep - head):]
    return prompt, response[: max_length - len(prompt)]


def encode_example(tokenizer, prompt: str, response: str, max_length: int,  # noqa: ANN001
                   ) -> tuple[list[int], list[int], bool]:
    """Return ``(input_ids, labels, truncated)`` of one example (no padding).

    The prompt and the response are tokenized separately, so the prompt's tokens are exactly those
    that generation starts from; BOS (when the tokenizer has one) starts the prompt and EOS ends the
    response, which teaches the model to stop.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    kept_prompt, kept_response = fit_to_length(prompt_ids, response_ids, max_length)
    truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
    return kept_prompt + kept_response, [IGNORE] * len(kept_prompt) + kept_response, truncated


def encode_prompt(tokenizer, prompt: str, max_length: int) -> list[int]:  # noqa: ANN001
    """The token ids generation starts from: BOS + prompt, cut like :func:`fit_to_length` would."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return fit_to_length(ids, [], max_length)[0] if len(ids) > max_length else ids


@dataclass(frozen=True)
class SFTEncoded:
    """Tokenized SFT examples, right-padded: ``input_ids``, ``attention_mask``, ``labels``, all ``(N, L)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[int]]], pad_id: int) -> SFTEncoded:
        """Right-pad ``(input_ids, labels)`` pairs to the longest one (pad id, mask 0, label -100)."""
        length = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for row, (ids, lab) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, : len(lab)] = torch.tensor(lab)
        return cls(input_ids, mask, labels)

    def batch(self, idx: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Return one batch on ``device``, trimmed to its longest sequence."""
        mask = self.attention_mask[idx]
        length = int(mask.sum(dim=1).max())
        batch = {"input_ids": self.input_ids[idx, :length], "attention_mask": mask[:, :length],
                 "labels": self.labels[idx, :length]}
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: ``(input_ids, attention_mask)``, both ``(len(prompts), L)``."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            mask[row, length - len(ids):] = 1
    return input_ids, mask
