"""Chat templates by name: what a plugin registers, and how a ``chat_template:`` setting finds one.

A ``chat_template:`` setting is, in this order: the name of a registered template (``chat_template: qwen2``),
a ``.jinja`` file, or the template's text. Templates are data: a plugin registers Jinja files (or text)
with ``align_register_chat_templates``, never code that builds prompts.

A template written for one model family also works with another family's tokenizer: the markers that
tokenizer lacks (``<|eot_id|>`` on a ChatML tokenizer) become several ordinary tokens, and the loss masks
stay exact (:class:`align.render.Renderer` never lets a token cross the edge of a reply). What would not
work is generation stopping at such a marker, so installing a template says so, and where the tokenizer
has the marker as one token, makes it the end-of-sequence token, as the family's instruct models do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import AlignError
from align.schema import did_you_mean

if TYPE_CHECKING:
    from align.plugin_manager import AlignPluginManager

__all__ = ["CHAT_TEMPLATE", "ChatTemplate", "resolve_chat_template"]

#: The registry kind of chat templates (``plugins.registry(CHAT_TEMPLATE)``).
CHAT_TEMPLATE = "chat template"

logger = logging.getLogger("align")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template a plugin registers by name (``align_register_chat_templates``).

    :param name: what ``chat_template:`` says to pick it.
    :param template: the Jinja text, or the path of a ``.jinja`` file (read when first used). Wrap each
        assistant reply in ``{% generation %}…{% endgeneration %}``, so that transformers'
        ``return_assistant_tokens_mask`` (and TRL's ``assistant_only_loss``) find the replies in a
        checkpoint trained with it; align finds them with or without the tags.
    :param description: one line for ``align plugins`` and the docs.
    :param tools: whether it writes assistant tool calls (and tool results). One that does not leaves the
        calls out, and align refuses data with tool calls rather than train on replies with parts missing.
    :param stop: the text that ends an assistant reply (``<|eot_id|>``), where it is not the tokenizer's
        end-of-sequence token; ``None`` when the template ends replies with ``{{ eos_token }}``.
    """

    name: str
    template: str | Path
    description: str
    tools: bool = False
    stop: str | None = None

    @property
    def text(self) -> str:
        """The Jinja text."""
        if isinstance(self.template, Path):
            try:
                return self.template.read_text(encoding="utf-8")
            except OSError as error:
                raise AlignError(f"chat template '{self.name}': {self.template}: {error.strerror}") from None
        return self.template

    def install(self, tokenizer: Any) -> str | None:
        """Make this the tokenizer's chat template; returns the text that ends a reply (``None``: the
        tokenizer's end-of-sequence token).

        When :attr:`stop` is one token of this tokenizer, it becomes the end-of-sequence token (saved with
        the checkpoint), so that generation stops where replies were trained to end. When it is not, the
        replies end in several tokens that no generation stops at, which is worth a warning.
        """
        tokenizer.chat_template = self.text
        if not self.stop or self.stop == tokenizer.eos_token:
            return self.stop
        if len(tokenizer(self.stop, add_special_tokens=False)["input_ids"]) == 1:
            logger.info(
                "chat template '%s': its replies end with %s, which becomes the end-of-sequence token (was %s)",
                self.name,
                self.stop,
                tokenizer.eos_token,
            )
            tokenizer.eos_token = self.stop
        else:
            logger.warning(
                "warning: chat template '%s' ends replies with %s, which this tokenizer has no token for: it is "
                "trained as several tokens, and generation, which stops at %s, will not stop there. Use a "
                "template of the model's own family, or a tokenizer that has its markers.",
                self.name,
                self.stop,
                tokenizer.eos_token,
            )
        return self.stop


def resolve_chat_template(
    value: str | None, plugins: AlignPluginManager | None = None, key: str = "chat_template"
) -> ChatTemplate | None:
    """The template a ``chat_template`` setting means: a registered name, else a file, else the template text.

    Stages call it when the recipe is checked as well as when they run, so a mistyped name or a missing
    file stops the recipe before any work.

    :param plugins: the registry of names; without it, only files and text are understood.
    :param key: the setting's place, for errors (``stages.sft.chat_template``).
    """
    if value is None:
        return None
    registry = plugins.registry(CHAT_TEMPLATE) if plugins is not None else {}
    if value in registry:
        return registry[value].obj  # type: ignore[no-any-return]
    if "{" in value:  # every template has a tag; a file name or template name has none
        return _parsed(ChatTemplate("given", value, "given as text"), key)
    path = Path(value).expanduser()
    if path.is_file():
        return _parsed(ChatTemplate(str(path), path, f"read from {path}"), key)
    if not value.strip():
        raise AlignError(f"{key} is empty", hint="leave it out to keep the tokenizer's chat template")
    known = ", ".join(sorted(registry)) or "none"
    if plugins is not None and _looks_like_a_name(value):
        raise AlignError(
            f"{key}: unknown chat template '{value}'{did_you_mean(value, registry)}",
            hint=f"registered chat templates: {known} (`align plugins` lists them); or give a .jinja file, "
            "or the template itself",
        )
    raise AlignError(
        f"{key}: {path}: no such file",
        hint=f"give a .jinja file, the template itself (text with {{{{ }}}} or {{% %}} tags), or a registered "
        f"chat template's name ({known})",
    )


def _parsed(template: ChatTemplate, key: str) -> ChatTemplate:
    """``template``, once its Jinja is known to parse: a syntax error is the user's to fix, not a traceback."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):  # transformers' {% generation %} tag, for parsing only
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[Generation, jinja2.ext.loopcontrols])
    try:
        environment.parse(template.text)
    except jinja2.TemplateSyntaxError as error:
        where = f" ({template.name})" if isinstance(template.template, Path) else ""
        raise AlignError(
            f"{key}: the chat template{where} is not valid Jinja: line {error.lineno}: {error.message}",
            hint="fix the template; transformers' chat templates are Jinja with an optional {% generation %} tag",
        ) from None
    return template


def _looks_like_a_name(value: str) -> bool:
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    return not value.endswith(".jinja") and not any(s in value for s in separators) and not value.startswith("~")
