"""The tools of a chat request, for the vLLM and SGLang adapters: schema checks and forced calls.

:func:`check_tool_schemas`: a `parameters` schema that is not valid JSON Schema is the client's
error, answered with HTTP 400 (naming the tool) before anything is rendered or compiled.
:func:`forced_call_structural_tag`: the xgrammar structural tag both servers constrain a completion
with when `tool_choice` forces a call ("required" or a named function, see :func:`forced_tools`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from v4_plugin.text.chat import DSML


def check_tool_schemas(tools: Iterable[Mapping[str, Any]] | None) -> None:
    """Raise ValueError naming the first tool whose `function.parameters` is not a valid JSON Schema
    (Draft 2020-12, the dialect OpenAI's function schemas follow). `tools` are OpenAI-format dicts
    (`{"type": "function", "function": {"name", "parameters", ...}}`); a tool without parameters is fine.
    Needs `jsonschema` (a dependency of both vLLM and SGLang)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    for index, tool in enumerate(tools or ()):
        function = tool.get("function") or {}
        parameters = function.get("parameters")
        if parameters is None:
            continue
        name = function.get("name") or f"#{index}"
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise ValueError(f"tool {name!r}: 'parameters' is not a valid JSON Schema at {where}: {exc.message}") \
                from None
        except RecursionError:
            raise ValueError(f"tool {name!r}: 'parameters' is nested too deeply to check") from None



# ---- forced calls: an xgrammar structural tag for exactly the official DSML format ------------------
_CROSS_PROPERTY = ("allOf", "anyOf", "oneOf", "not", "if", "$ref", "dependentRequired", "dependentSchemas",
                   "patternProperties", "minProperties", "maxProperties", "propertyNames", "unevaluatedProperties")
_NOTES = {"description", "title", "examples", "default"}  # schema keys that constrain nothing


def _raw_string(schema: Any):
    """The raw-text format (`string="true"`, as the encoder writes strings) of a string property that is
    free text or one of a list of strings; None for any other schema (its value is written as JSON)."""
    from xgrammar.structural_tag import AnyTextFormat, ConstStringFormat, OrFormat

    if not isinstance(schema, dict) or schema.get("type", "string") != "string":
        return None
    enum = schema.get("enum")
    if set(schema) <= _NOTES | {"type"} and "type" in schema:
        return AnyTextFormat()
    if set(schema) <= _NOTES | {"type", "enum"} and enum and all(isinstance(v, str) and v for v in enum):
        return OrFormat(elements=[ConstStringFormat(value=v) for v in enum])
    return None


def _invoke_format(name: str, parameters: Any):
    """The xgrammar format of one `<｜DSML｜invoke>` of tool `name` whose arguments satisfy `parameters`,
    in the official layout: each declared property in order (the required ones always), free-text and
    enumerated strings raw (`string="true"`), every other value JSON (`string="false"`, one space at most between JSON
    tokens, as the encoder writes them). None when the schema constrains more than each property on
    its own (`anyOf`, `$ref` at the root, ...) or requires a property it does not declare."""
    from xgrammar.structural_tag import ConstStringFormat, JSONSchemaFormat, OptionalFormat, SequenceFormat, TagFormat

    schema = {"type": "object"} if parameters is None else parameters
    if not isinstance(schema, dict) or schema.get("type", "object") != "object" or \
            any(k in schema for k in _CROSS_PROPERTY):
        return None
    properties, required = schema.get("properties") or {}, set(schema.get("required") or ())
    if not required <= set(properties):
        return None
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}  # for `$ref`s inside a property
    elements = []
    for key, sub in properties.items():
        value = _raw_string(sub)
        if value is not None:
            begin = f'<{DSML}parameter name="{key}" string="true">'
        else:
            begin = f'<{DSML}parameter name="{key}" string="false">'
            value = JSONSchemaFormat(json_schema={**sub, **defs} if isinstance(sub, dict) else sub,
                                     max_whitespace_cnt=1)
        element = TagFormat(begin=begin, content=value, end=f"</{DSML}parameter>\n")
        elements.append(element if key in required else OptionalFormat(content=element))
    return TagFormat(begin=f'<{DSML}invoke name="{name}">\n',
                     content=SequenceFormat(elements=elements) if elements else ConstStringFormat(value=""),
                     end=f"</{DSML}invoke>\n")


def forced_call_structural_tag(tools: Iterable[Mapping[str, Any]], *, parallel_tool_calls: bool = True,
                               reasoning: bool = False):
    """The xgrammar `StructuralTag` of a completion that must call one of `tools` (OpenAI-format dicts:
    all the request's tools for `tool_choice` "required", the named one for a named choice): a DSML
    `tool_calls` block of one call (`parallel_tool_calls` false) or more, each with arguments valid
    against its tool's `parameters`, written exactly as the official encoder writes calls (so the
    parsers, which follow DeepSeek's official grammar, read every completion it allows). With
    `reasoning`, the completion first runs free to `</think>` (when no reasoning parser owns that part).

    Returns None when a tool's schema cannot be held to this layout (see :func:`_invoke_format`); the
    caller then uses xgrammar's looser built-in `deepseek_v4` tag."""
    from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, SequenceFormat, StructuralTag, TagFormat,
                                         TagsWithSeparatorFormat)

    invokes = [_invoke_format(t["function"]["name"], t["function"].get("parameters")) for t in tools]
    if not invokes or any(i is None for i in invokes):
        return None
    calls = SequenceFormat(elements=[
        ConstStringFormat(value=f"\n\n<{DSML}tool_calls>\n"),
        TagsWithSeparatorFormat(tags=invokes, separator="", at_least_one=True,
                                stop_after_first=not parallel_tool_calls),
        ConstStringFormat(value=f"</{DSML}tool_calls>"),
    ])
    if reasoning:
        calls = SequenceFormat(elements=[TagFormat(begin="", content=AnyTextFormat(), end="</think>"), calls])
    return StructuralTag(format=calls)


def forced_tools(tools: Iterable[Any] | None, tool_choice: Any) -> list[dict[str, Any]]:
    """The tools a forced `tool_choice` lets the model call, as OpenAI-format dicts: all function tools of
    the request for "required", the named one for a named choice. `tools` and `tool_choice` are the
    frameworks' request objects (pydantic models with `.function`) or plain dicts."""
    dumped = [t.model_dump() if hasattr(t, "model_dump") else dict(t) for t in tools or ()]
    dumped = [t for t in dumped if t.get("type", "function") == "function" and t.get("function")]
    choice = tool_choice.model_dump() if hasattr(tool_choice, "model_dump") else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name", choice.get("name"))
        return [t for t in dumped if t["function"].get("name") == name]
    return dumped
