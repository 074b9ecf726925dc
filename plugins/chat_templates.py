"""Built-in chat templates: the conversation formats of common model families, as Jinja files.

Each file in ``chat_templates/`` writes one family's format as its instruct models were trained on it,
with every assistant reply inside ``{% generation %}``. ``chat_template: NAME`` picks one; this module only
says which file has which name and what ends its replies.
"""

from __future__ import annotations

from pathlib import Path

from align import hookimpl
from align.chat_template import ChatTemplate

FOLDER = Path(__file__).with_name("chat_templates")

TEMPLATES = [
    ChatTemplate(
        "chatml",
        FOLDER / "chatml.jinja",
        "ChatML (<|im_start|>role … <|im_end|>), as OpenHermes, Dolphin and SmolLM2; no tool calls",
        stop="<|im_end|>",
    ),
    ChatTemplate(
        "chatml_tools",
        FOLDER / "chatml_tools.jinja",
        "ChatML with Hermes-style function calling: tools in the system turn, <tool_call> and <tool_response>",
        tools=True,
        stop="<|im_end|>",
    ),
    ChatTemplate(
        "qwen2",
        FOLDER / "qwen2.jinja",
        "Qwen2 and Qwen2.5 Instruct: ChatML with Qwen's default system prompt and tool calls",
        tools=True,
        stop="<|im_end|>",
    ),
    ChatTemplate(
        "llama3",
        FOLDER / "llama3.jinja",
        "Llama 3 Instruct (3.1 to 3.3 without their date lines): <|start_header_id|>role<|end_header_id|> … "
        "<|eot_id|>; no tool calls",
        stop="<|eot_id|>",
    ),
    ChatTemplate(
        "mistral",
        FOLDER / "mistral.jinja",
        "Mistral and Mixtral Instruct: [INST] … [/INST] reply</s>, the system message in the first [INST]; "
        "no tool calls",
    ),
    ChatTemplate(
        "gemma",
        FOLDER / "gemma.jinja",
        "Gemma 2 and 3: <start_of_turn>user|model … <end_of_turn>, the system message in the first user turn; "
        "no tool calls",
        stop="<end_of_turn>",
    ),
]


@hookimpl
def align_register_chat_templates() -> list[ChatTemplate]:
    return TEMPLATES
