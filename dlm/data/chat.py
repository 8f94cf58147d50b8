"""Prompt formatting for instruction-tuned models: data shared by training and inference.

The tokenizer's own chat template when it has one, else the documented default
``DEFAULT_FORMAT`` (installed as the output's chat template, so
``apply_chat_template`` reproduces it at inference).
"""

from __future__ import annotations

# The documented default prompt format, used when the tokenizer has no chat template.
DEFAULT_FORMAT = "### Instruction:\n{prompt}\n### Response:\n"


# The same format as a Jinja chat template (system text first, then user/assistant turns).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> str:
    """"tokenizer" if the tokenizer has its own chat template; else install the default, return "default"."""
    current = getattr(tokenizer, "chat_template", None)
    if current:
        return "default" if current == DEFAULT_CHAT_TEMPLATE else "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees: chat template with the generation prompt appended."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_chat(tokenizer, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Prompt token ids exactly as SFT builds them (training and inference share this)."""
    if not conversations:
        return []
    own_template = getattr(tokenizer, "chat_template", None) not in (None, DEFAULT_CHAT_TEMPLATE)
    texts = [render_prompt(tokenizer, messages) for messages in conversations]
    # A tokenizer's own template writes its BOS itself; the default lets the tokenizer add its usual specials.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=not own_template)["input_ids"]]
