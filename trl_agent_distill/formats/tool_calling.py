"""Native tool calling: the model calls tools through its chat template, stored as OpenAI-style `tool_calls`.

The model writes its calls in the markup its chat template renders them in, by default Hermes / Qwen's::

    I will look at the folder first.
    <tool_call>
    {"name": "ls", "arguments": {"a": true}}
    </tool_call>

one block per call, any number per reply. A `ToolCallParser` reads them (`TOOL_CALL_PARSERS`: "hermes", the
default, and "pythonic", BFCL's ``[ls(a=True), cd(folder="x")]``, read with `ast` and `ast.literal_eval`, never
`eval`). The episode stores a reply with calls as an OpenAI assistant message (the text beside the calls as
`content`, the calls as `tool_calls`) and each result as a `tool` message; a reply without calls is a plain
assistant message, whose meaning the environment decides (in BFCL it ends the user's turn). Call markup that does
not read (bad JSON, an argument that is not a literal) is a parse error, fed back to the model as a user message.
Given `tool_schemas`, the format also rejects unknown tools and arguments that do not fit a tool's schema
(`check_arguments`); an environment whose tools differ per task checks them itself and answers a rejected call with
an error result.

`arguments` are stored as JSON strings, as the OpenAI API sends them: a string column holds the calls of every tool
in Arrow, where argument dicts become a struct of every argument name of every tool, filled with nulls, wherever
`datasets` does not infer its `Json` type (`Dataset.from_list`, for one). `with_argument_dicts` decodes them for
chat templates that need dicts (Qwen2.5 and Llama 3.1 templates `| tojson` or iterate them).

Segmentation: the text beside the calls is REASON, the calls are ACT (the chat template renders them), tool results
are OBS, and a reply without calls is the agent's answer (ACT). In a reply kept as text (one that failed to parse)
the call markup is ACT and the text around it REASON.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..spans import Span, spans_from_cuts
from .base import EnvironmentFormat, ParsedReply, ParseError


class ToolCallSyntaxError(ValueError):
    """Call markup that does not read as calls; the message says what is wrong, for the model to fix."""


@dataclass(frozen=True)
class FunctionCall:
    """One call: the tool's `name`, its keyword `arguments`, and the `id` its result answers to."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": dict(self.arguments)}


@dataclass(frozen=True)
class ToolResult:
    """What a call returned (`content`, as the model reads it); `error` when the call was rejected or raised."""

    call: FunctionCall
    content: str
    error: bool = False


# ---------------------------------------------------------------------------------------------- parsers
class ToolCallParser(ABC):
    """Reads one markup of tool calls out of a reply and writes calls in it."""

    name: str
    example: str
    """One call as the model should write it (shown in parse errors)."""

    @abstractmethod
    def locate(self, text: str) -> list[tuple[int, int]]:
        """Where call markup lies in `text`, in order, also when it is malformed (a parse error then says why)."""

    @abstractmethod
    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        """(name, arguments) of every call in `text`; `ToolCallSyntaxError` when some markup does not read."""

    @abstractmethod
    def write(self, calls: Sequence[FunctionCall]) -> str:
        """The markup of `calls`, as the chat template renders them."""


class HermesParser(ToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    example = '<tool_call>\n{"name": "tool_name", "arguments": {"argument": "value"}}\n</tool_call>'
    _BLOCK = re.compile(r"<tool_call>(?P<body>.*?)(?P<close></tool_call>|\Z)", re.DOTALL)

    def locate(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in self._BLOCK.finditer(text)]

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        calls = []
        for match in self._BLOCK.finditer(text):
            if not match.group("close"):
                raise ToolCallSyntaxError("a <tool_call> block is not closed with </tool_call>")
            try:
                call = json.loads(match.group("body"))
            except json.JSONDecodeError as error:
                raise ToolCallSyntaxError(f"a tool call is not valid JSON ({error.msg} at character {error.pos})") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
                raise ToolCallSyntaxError('a tool call must be a JSON object with a "name" string')
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the API sends them
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            if not isinstance(arguments, dict):
                raise ToolCallSyntaxError(f'the "arguments" of {call["name"]!r} must be a JSON object')
            calls.append((call["name"], arguments))
        return calls

    def write(self, calls: Sequence[FunctionCall]) -> str:
        return "\n".join(hermes_block(call.name, json.dumps(dict(call.arguments), ensure_ascii=False))
                         for call in calls)


def hermes_block(name: str, arguments_json: str) -> str:
    """One Hermes call block with `arguments_json` written as given (as the tiny ChatML template renders it)."""
    return f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments_json}}}\n</tool_call>'


class PythonicParser(ToolCallParser):
    """A Python list of keyword calls, ``[cd(folder="docs"), ls(a=True)]`` (BFCL's prompting format, Llama 3.2's
    pythonic tool calls). Read with `ast`; argument values must be literals (`ast.literal_eval`), nothing is run."""

    name = "pythonic"
    example = '[tool_name(argument="value"), other_tool(count=2)]'
    _START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")

    def locate(self, text: str) -> list[tuple[int, int]]:
        spans, position = [], 0
        while (match := self._START.search(text, position)) is not None:
            end = _python_list_end(text, match.start())
            if end is None:  # an opened call list that never parses: the rest of the reply is its markup
                spans.append((match.start(), len(text)))
                break
            spans.append((match.start(), end))
            position = end
        return spans

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        calls = []
        for start, end in self.locate(text):
            for name, positional, keywords in python_calls(text[start:end]):
                if positional:
                    raise ToolCallSyntaxError(f"pass the arguments of {name!r} by name (argument=value)")
                calls.append((name, keywords))
        return calls

    def write(self, calls: Sequence[FunctionCall]) -> str:
        written = (f"{call.name}({', '.join(f'{key}={value!r}' for key, value in call.arguments.items())})"
                   for call in calls)
        return f"[{', '.join(written)}]"


def python_calls(source: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """(name, positional values, keyword values) of each call in `source`: one call or a list of calls, by plain
    name, with literal values only. Nothing is evaluated (`ast.literal_eval` reads the values)."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as error:
        raise ToolCallSyntaxError(f"the calls are not valid Python ({error.msg})") from None
    nodes = node.elts if isinstance(node, ast.List) else [node]
    calls = []
    for call in nodes:
        if not isinstance(call, ast.Call):
            raise ToolCallSyntaxError("write a list of calls such as [tool_name(argument=value)]")
        if not isinstance(call.func, ast.Name):
            raise ToolCallSyntaxError(f"call tools by their name, not {ast.unparse(call.func)!r}")
        name = call.func.id
        if any(keyword.arg is None for keyword in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args):
            raise ToolCallSyntaxError(f"write the arguments of {name!r} out, without * or **")
        try:
            positional = [ast.literal_eval(argument) for argument in call.args]
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ToolCallSyntaxError(f"the arguments of {name!r} must be literal values (strings, numbers, lists, "
                                      "dicts, True/False/None)") from None
        calls.append((name, positional, keywords))
    return calls


def _python_list_end(text: str, start: int) -> int | None:
    """The end of the longest `text[start:end]` that is a Python list (the call list opened at `start`)."""
    for end in sorted((i + 1 for i in range(start, len(text)) if text[i] == "]"), reverse=True):
        try:
            node = ast.parse(text[start:end], mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            continue
        if isinstance(node, ast.List):
            return end
    return None


TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {parser.name: parser for parser in (HermesParser(), PythonicParser())}


def register_tool_call_parser(parser: ToolCallParser) -> None:
    """Make `parser` available as `ToolCallingFormat(parser=parser.name)`."""
    TOOL_CALL_PARSERS[parser.name] = parser


def tool_calls_reply(content: str | None, calls: Sequence[tuple[str, str]]) -> str:
    """The Hermes reply text of a server's structured answer: `content`, then one block per (name, arguments JSON),
    the arguments written as the server sent them (malformed JSON then fails to parse, as the model wrote it)."""
    blocks = [hermes_block(name, arguments or "{}") for name, arguments in calls]
    return "\n".join([content, *blocks] if content else blocks)


def with_argument_dicts(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`messages` with each tool call's JSON-string `arguments` decoded, for a chat template: templates that
    `| tojson` them (Qwen2.5) would quote a string twice, those that iterate them (Llama 3.1) fail on one. Messages
    without such calls are passed through as they are."""
    converted = []
    for message in messages:
        tool_calls = message.get("tool_calls")
        if not tool_calls or not any(isinstance(_function(call).get("arguments"), str) for call in tool_calls):
            converted.append(message)
            continue
        calls = []
        for call in tool_calls:
            function = dict(_function(call))
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # not JSON: the template shows it as the model wrote it
            calls.append({**call, "function": function} if "function" in call else function)
        converted.append({**message, "tool_calls": calls})
    return converted


def _function(call: Mapping[str, Any]) -> Mapping[str, Any]:
    return call.get("function") or call


# ---------------------------------------------------------------------------------------------- arguments
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list, tuple),
    "object": (dict,), "null": (type(None),),
}


def schema_function(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function part of an OpenAI tool schema ({"type": "function", "function": {...}}) or a bare one."""
    return schema.get("function", schema) if schema.get("type") == "function" else schema


def check_arguments(schema: Mapping[str, Any], arguments: Mapping[str, Any], *, types: bool = True) -> str | None:
    """Why `arguments` do not fit the tool `schema` (unknown or missing names; with `types`, JSON types and enums),
    or None."""
    function = schema_function(schema)
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    name = function.get("name")
    for key in arguments:
        if key not in properties:
            known = ", ".join(properties) or "none"
            return f"{name} has no argument {key!r} (its arguments: {known})"
    missing = [key for key in parameters.get("required") or [] if key not in arguments]
    if missing:
        return f"{name} needs the argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    for key, value in arguments.items() if types else ():
        expected = properties[key].get("type")
        kinds = _JSON_TYPES.get(expected) if isinstance(expected, str) else None
        wrong_bool = isinstance(value, bool) and expected in ("integer", "number")
        if kinds is not None and (wrong_bool or not isinstance(value, kinds)):
            return f"the argument {key!r} of {name} must be a JSON {expected}, got {json.dumps(value)[:60]}"
        allowed = properties[key].get("enum")
        if allowed is not None and value not in allowed:
            return f"the argument {key!r} of {name} must be one of {allowed}, got {value!r}"
    return None


# ---------------------------------------------------------------------------------------------- the format
class ToolCallingFormat(EnvironmentFormat[tuple[FunctionCall, ...]]):
    """Tool calls through the chat template (see the module docstring).

    Args:
        parser: the markup the model writes calls in: a name in `TOOL_CALL_PARSERS` or a `ToolCallParser`.
        tool_schemas: OpenAI tool schemas the calls are checked against (unknown tools and arguments that do not
            fit are parse errors); None when the environment checks them (its tools differ per task).
    """

    name = "tool_calling"
    stop = ()  # the model ends its turn itself; the results come back as tool messages

    def __init__(self, parser: str | ToolCallParser = "hermes",
                 tool_schemas: Sequence[Mapping[str, Any]] | None = None):
        if isinstance(parser, str):
            if parser not in TOOL_CALL_PARSERS:
                raise ValueError(f"Unknown tool call parser {parser!r}; the parsers are {sorted(TOOL_CALL_PARSERS)} "
                                 "(add one with register_tool_call_parser).")
            parser = TOOL_CALL_PARSERS[parser]
        self.parser = parser
        self.tool_schemas = {schema_function(schema)["name"]: schema for schema in tool_schemas or []}
        super().__init__()

    # ------------------------------------------------------------------------------------------ speaking
    def system_prompt(self) -> str:
        return self.prompts["system_prompt"]

    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[tuple[FunctionCall, ...]] | ParseError:
        if not self.parser.locate(reply):
            return ParsedReply(content=reply, action=())
        try:
            read = self.parser.parse(reply)
        except ToolCallSyntaxError as error:
            return self._error(reply, self.prompts["truncated"] if truncated else str(error))
        calls = tuple(FunctionCall(name, arguments, id=call_id(reply, index))
                      for index, (name, arguments) in enumerate(read))
        for call in calls if self.tool_schemas else ():
            problem = self.check_call(call, self.tool_schemas)
            if problem is not None:
                return self._error(reply, problem)
        return ParsedReply(content=reply, action=calls)

    @staticmethod
    def check_call(call: FunctionCall, schemas: Mapping[str, Mapping[str, Any]], *, types: bool = True) -> str | None:
        """Why `call` is not a call of one of `schemas` (by tool name), or None (see `check_arguments`)."""
        if call.name not in schemas:
            return f"there is no tool {call.name!r} (the tools are {', '.join(sorted(schemas))})"
        return check_arguments(schemas[call.name], call.arguments, types=types)

    def _error(self, reply: str, cause: str) -> ParseError:
        return ParseError(content=reply, message=self.prompts["parse_error"].format(cause=cause,
                                                                                    example=self.parser.example))

    def write(self, thought: str, action: tuple[FunctionCall, ...]) -> str:
        if not action:
            return thought
        calls = self.parser.write(action)
        return f"{thought}\n{calls}" if thought else calls

    def beside_calls(self, reply: str) -> str:
        """The reply's text without its call markup (the message's `content` next to its `tool_calls`)."""
        kept, position = [], 0
        for start, end in self.parser.locate(reply):
            kept.append(reply[position:start])
            position = end
        kept.append(reply[position:])
        return "\n".join(part.strip() for part in kept if part.strip())

    def assistant_message(self, parsed: ParsedReply[tuple[FunctionCall, ...]]) -> dict[str, Any]:
        if not parsed.action:
            return {"role": "assistant", "content": parsed.content}
        tool_calls = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments), ensure_ascii=False)}}
            for call in parsed.action
        ]
        return {"role": "assistant", "content": self.beside_calls(parsed.content), "tool_calls": tool_calls}

    def observation_text(self, observation: Any) -> str:
        if isinstance(observation, ParseError):
            return observation.message
        if _is_results(observation):
            return "\n".join(result.content for result in observation)
        return str(observation)

    def observation_messages(self, observation: Any) -> list[dict[str, Any]]:
        """One `tool` message per result; anything else (a parse error, the user's next turn) as a user message."""
        if _is_results(observation):
            return [{"role": "tool", "tool_call_id": result.call.id, "name": result.call.name,
                     "content": result.content} for result in observation]
        return [{"role": "user", "content": self.render(observation)}]

    def action_key(self, action: tuple[FunctionCall, ...]) -> str:
        """The calls as canonical JSON (names and arguments in order, keys sorted; ids left out)."""
        return json.dumps([call.as_dict() for call in action], sort_keys=True, ensure_ascii=False)

    # ------------------------------------------------------------------------------------------ reading
    def looks_like(self, text: str) -> bool:
        return bool(self.parser.locate(text))

    def no_step_reason(self, *, assistant: bool) -> str:
        return f"no recognisable step: expected tool calls such as {self.parser.example!r} (tool_calling)"

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """Call markup is ACT; the text around it REASON (a transcript's: other). Without markup, an assistant's
        text is its answer (ACT)."""
        markup = self.parser.locate(text)
        if not markup:
            return [Span("act" if assistant else "other", 0, len(text))]
        around = "reason" if assistant else "other"
        cuts, position = [], 0
        for start, end in markup:
            if text[position:start].strip():
                cuts.append((position, around))
            cuts.append((start if text[position:start].strip() else position, "act"))
            position = end
        if text[position:].strip():
            cuts.append((position, around))
        return spans_from_cuts(cuts, len(text))


def call_id(reply: str, index: int) -> str:
    """A stable id for the `index`-th call of `reply`: nine alphanumerics, as the strictest templates (Mistral's)
    require."""
    return hashlib.sha1(f"{index}\x00{reply}".encode()).hexdigest()[:9]


def _is_results(observation: Any) -> bool:
    """Whether `observation` is what an environment returns for calls: one `ToolResult` per call."""
    return bool(observation) and isinstance(observation, (list, tuple)) and all(
        isinstance(item, ToolResult) for item in observation)
