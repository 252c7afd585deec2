"""How a problem's text becomes the prompt the policy sees: R1-Zero's template, the model's
chat template, or the text itself; shared by the learner's dispatcher, the benchmarks and
generation jobs, so a prompt reads the same in training and in evaluation."""

from __future__ import annotations

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
"""DeepSeek-R1-Zero's training template (arXiv:2501.12948, Table 1)."""


def render_prompt(text: str, template: str, tokenizer=None) -> str:
    """The prompt text the policy sees: R1-Zero's template, the chat template, or `text` itself."""
    if template == "r1-zero":
        return R1_ZERO.format(prompt=text)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "none":
        return text
    raise ValueError(f"unknown template {template!r}")


def tokenize_prompt(prompt: str, template: str, tokenizer) -> list[int]:
    """Token ids as the actors' engines would encode the prompt (the chat template already
    carries its special tokens, so none are added to it)."""
    return list(tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"])
