"""A checkpoint's chat template rendered as transformers renders it (sandboxed jinja2, trim / lstrip
blocks, loop controls, `tojson`, `raise_exception`), the same for every engine that renders itself."""
from __future__ import annotations

import json

from ..exporters.errors import MoteExportError


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except jinja2.exceptions.TemplateError as exc:
        raise MoteExportError(f"the chat template failed to render ({exc})") from None
    except Exception as exc:  # a template is a stranger's program: range(10**20), 1 + 'a', ...
        raise MoteExportError(f"the chat template failed to render ({type(exc).__name__}: {exc})") from None
