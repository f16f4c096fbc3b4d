"""docs/reference.md, generated from the code: ``python -m qtasks.reference > docs/reference.md``
(``make docs``). A test fails when the file and the code disagree.

The settings and the ``Task`` fields are read with their ``#:`` comments from the source;
the triggers and events from :mod:`qtasks.plugins`; the command line from its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

import msgspec

from qtasks import config, plugins, records
from qtasks.cli import build_parser

_FIELD = re.compile(r"^    (\w+): ([^=]+?)(?: = (.+))?$")


def _documented_fields(cls: type) -> dict[str, str]:
    """Each field of ``cls`` with the text of the ``#:`` comment lines just above it."""
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
            continue
        match = _FIELD.match(line)
        if match:
            docs[match.group(1)] = " ".join(comment)
        comment = []
    return docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("``", "`")


def _range(name: str) -> str:
    if name in config._CHOICES:
        return "one of " + ", ".join(f"`{c}`" for c in config._CHOICES[name])
    if name in config._ABOVE_ZERO:
        return "> 0"
    if name in config._AT_LEAST:
        return f">= {config._AT_LEAST[name]:g}"
    return ""


def settings() -> list[str]:
    docs = _documented_fields(config.QueueConfig)
    lines = [
        "## Settings",
        "",
        "`QueueTasks(..., name=value)`, `QueueConfig(name=value)` or the environment variable.",
        "Every value is checked for its type and range when the app is built (`ConfigError`).",
        "",
        "| setting | type | default | environment | range | what |",
        "|---|---|---|---|---|---|",
    ]
    for field in dataclasses.fields(config.QueueConfig):
        default = field.default
        shown = f"`{default!r}`" if default != "" else '`""`'
        lines.append(
            f"| `{field.name}` | {field.type} | {shown} | `QTASKS_{field.name.upper()}` | {_range(field.name)} "
            f"| {_cell(docs.get(field.name, ''))} |"
        )
    return lines


def task_fields() -> list[str]:
    docs = _documented_fields(records.Task)
    lines = [
        "## `Task` fields",
        "",
        "What `app.get(uuid)`, `app.wait(uuid)` and a handle's `get()` return (`qtasks.Task`).",
        "",
        "| field | what |",
        "|---|---|",
    ]
    for name in msgspec.structs.fields(records.Task):
        lines.append(f"| `{name.name}` | {_cell(docs.get(name.name, ''))} |")
    return lines


def _hooks(title: str, intro: str, hooks: dict[str, plugins.Hook], replaces: bool) -> list[str]:
    header = "| name | when | arguments |" + (" a returned dict |" if replaces else "")
    rule = "|---|---|---|" + ("---|" if replaces else "")
    lines = [title, "", intro, "", header, rule]
    for name, hook in hooks.items():
        arguments = ", ".join(f"`{a}`" for a in hook.arguments)
        row = f"| `{name}` | {_cell(hook.when)} | {arguments} |"
        if replaces:
            row += f" {_cell(hook.replaces) or 'is ignored'} |"
        lines.append(row)
    return lines


def _help(parser: argparse.ArgumentParser) -> str:
    """A parser's help at a fixed width (not the terminal's), so the file is the same everywhere."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
    return parser.format_help().rstrip()


def command_line() -> list[str]:
    parser = build_parser()
    lines = ["## The command line", "", "```", _help(parser), "```"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += ["", f"### `qtasks ... {name}`", "", "```", _help(sub), "```"]
    return lines


def render() -> str:
    parts = [
        "# Reference",
        "",
        "Generated from the code by `make docs` (`python -m qtasks.reference`); a test keeps it true.",
        "",
        *settings(),
        "",
        *task_fields(),
        "",
        *_hooks(
            "## Plugin triggers",
            "`app.add_plugin(plugin, trigger_names=[...])`: `plugin.trigger(name, **arguments)` is called (sync or "
            "async) with these keyword arguments, in this order for a task. A name not in this table is refused.",
            plugins.TRIGGER_HOOKS,
            True,
        ),
        "",
        *_hooks(
            "## Events",
            "`@app.events.on.<event>()`: the handler gets the keyword arguments it names among these.",
            plugins.EVENT_HOOKS,
            False,
        ),
        "",
        *command_line(),
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
