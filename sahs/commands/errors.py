"""One line for a user error: what is wrong and how to fix it, without a traceback or a usage dump.

``sahs`` prints ``UserError`` messages as they are. A config that does not parse raises jsonargparse's
nested report (every union member tried, every value given, about 30 lines); this keeps its one useful
branch: the full key, the value given and the keys or values that are accepted there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re

from sahs.errors import UserError

_PARSER_KEY = re.compile(r'^(?:- )?Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$')
_CLASS_PATH = re.compile(r"class_path '(?P<path>[\w.]+)'")
_UNKNOWN = re.compile(r"""(?:Option '(?P<a>[^']+)' is not accepted|No action for key "(?P<b>[^"]+)")""")
_EXPECTED = re.compile(r"Expected a (?P<type>.+?)\. Got value: (?P<value>.*)$")
_LITERAL = re.compile(r"Literal\[(?P<values>.*)\]")
_UNEXPECTED = re.compile(r"(?:Group '(?P<group>[\w.]+)' )?(?:does not accept option '|unrecognized arguments: --)"
                         r"(?P<key>[\w.]+)")
_CLASS_NAME = re.compile(r"<class '(?:[\w]+\.)*(?P<name>\w+)'>")
# What each top-level section of a run config is read into (``sahs fit`` and the verbs that share it).
SECTIONS = {"data": "sahs.data.datamodule.ActivationDataModule", "model": "sahs.models.module.DetectorModule",
            "trainer": "lightning.pytorch.Trainer"}
TOP_LEVEL = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path")


def user_error_line(error: BaseException, verb: str | None = None) -> str | None:
    """The one line to print for ``error``, or None if it is not the user's to fix (a bug: keep the traceback).

    ``verb`` is the command's verb, so that an option it lacks can be named as ``sahs <verb>``'s.
    """
    if isinstance(error, UserError):
        return " ".join(str(error).split())
    if isinstance(error, argparse.ArgumentError):
        return config_error_line(str(error), verb)
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _ancestors(lines: list[str], index: int) -> list[int]:
    """Indices of the lines that enclose line ``index`` in the indented report, outermost first."""
    found, level = [], _indent(lines[index])
    for i in range(index - 1, -1, -1):
        if lines[i].strip() and _indent(lines[i]) < level:
            found.append(i)
            level = _indent(lines[i])
    return found[::-1]


def _is_list_key(lines: list[str], index: int) -> bool:
    """Whether the ``Parser key`` at ``index`` takes a list (its union's first member is ``list[...]``)."""
    following = lines[index + 1:index + 3]
    return any(line.strip().startswith("Subtypes: [list[") for line in following)


def _accepted_keys(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def config_error_line(message: str, verb: str | None = None) -> str:
    """jsonargparse's nested parse error, reduced to the key at fault and what it accepts."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) == 1 and (match := _UNEXPECTED.search(lines[0])):
        key = f"{match['group']}.{match['key']}" if match["group"] else match["key"]
        return _unknown_top_level(key, verb)
    leaf = next((i for i, line in enumerate(lines) if _UNKNOWN.search(line) or _EXPECTED.search(line)), None)
    if leaf is None:
        return _union_mismatch(lines) or "config error: " + " ".join(line.strip() for line in lines[:2] if not line.strip().startswith("Given"))
    path, class_path = [], None
    for i in [*_ancestors(lines, leaf), leaf]:
        if match := _PARSER_KEY.match(lines[i].strip()):
            path.append(match["key"])
            if _is_list_key(lines, i):
                path.append("[]")
        if match := _CLASS_PATH.search(lines[i]):
            class_path = match["path"]
            if path and path[-1] == "[]":  # name the list item by its class
                path[-1] = f"[{class_path.rsplit('.', 1)[-1]}]"
    where = ".".join(path).replace(".[", "[")
    if match := _UNKNOWN.search(lines[leaf]):
        key = match["a"] or match["b"]
        full = f"{where}.{key}" if where else key
        accepted = _accepted_keys(class_path) if class_path else []
        if not accepted:
            return f"config error: unknown key {full} (see `--help` for the accepted keys)"
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], accepted, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        owner = class_path.rsplit(".", 1)[-1]
        return f"config error: unknown key {full}; {owner} accepts {', '.join(accepted)}{hint}"
    match = _EXPECTED.search(lines[leaf])
    literal = _LITERAL.search(match["type"])
    accepted = literal["values"] if literal else match["type"].replace("<class '", "").replace("'>", "")
    return f"config error: {where or 'a value'} got {match['value']!r}; accepted: {accepted}"


def _union_mismatch(lines: list[str]) -> str:
    """``Parser key "data.top_k": Does not validate against any of the Union subtypes`` with the value given:
    the key, the value and the types accepted (``int or null``); empty when the report is not of that kind."""
    subtypes = next((i for i, line in enumerate(lines) if line.strip().startswith("Subtypes: [")), None)
    given = next((line.strip()[len("Given value: "):] for line in lines if line.strip().startswith("Given value: ")), None)
    if subtypes is None or given is None:
        return ""
    keys = [match["key"] for i in [*_ancestors(lines, subtypes)] if (match := _PARSER_KEY.match(lines[i].strip()))]
    text = lines[subtypes].strip()[len("Subtypes: "):]
    accepted = _CLASS_NAME.sub(lambda m: "null" if m["name"] == "NoneType" else m["name"], text).strip("[]")
    accepted = " or ".join(part.strip() for part in re.split(r",\s*(?![^\[]*\])", accepted))
    where = keys[-1] if keys else "a value"
    return f"config error: {where} got {given!r}; accepted: {accepted}"


def _sections() -> dict[str, str]:
    """Every section of a run config and the class it is read into: ``data``, ``run``, each verb's options..."""
    from sahs.commands.run_config import verb_options

    found = {**SECTIONS, "run": "sahs.commands.runs.RunIdentity"}
    found.update({verb: f"{options.__module__}.{options.__qualname__}" for verb, options in verb_options().items()})
    return found


def _unknown_top_level(key: str, verb: str | None = None) -> str:
    """A key outside any class (``data.cache_dri``, ``trainr``, ``loao.top_kk``): list what its section accepts.

    A bare name that some section has (``sahs fit --top_k 8``) is named with its section: the short form
    stands only for the verb's own options (``sahs loao --top_k 8`` is ``--loao.top_k 8``).
    """
    section, _, name = key.partition(".")
    sections = _sections()
    if not name and key not in sections and key not in TOP_LEVEL:
        owners = [s for s, class_path in sections.items() if key in _accepted_keys(class_path)]
        verbs = [s for s in owners if s not in SECTIONS and s != "run"]
        meant = [s for s in owners if s not in verbs] or verbs
        if owners:
            command = f"`sahs {verb}`" if verb else "this verb"
            named = [f"`sahs {v}`" for v in verbs]
            listed = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else "".join(named)
            short = f" (the short --{key} is an option of {listed} only)" if verbs else ""
            return (f"config error: --{key} is not an option of {command}: did you mean "
                    f"{' or '.join(f'--{s}.{key}' for s in meant)}?{short}")
    if name and section in sections:
        accepted = _accepted_keys(sections[section])
        owner = f"{section} ({sections[section].rsplit('.', 1)[-1]})"
    else:
        accepted, name, owner = [*TOP_LEVEL, *(s for s in sections if s not in TOP_LEVEL)], key, "a run config"
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f" (did you mean {section + '.' if name and section in sections else ''}{close[0]}?)" if close else ""
    return f"config error: unknown key {key}; {owner} accepts {', '.join(accepted)}{hint}"
