"""One object per agent protocol: what the agent is prompted with and writes, and what the segmenter reads.

`CodeActFormat` and `ReActFormat` are `AgentFormat`s (prompts, stop strings, `parse`, `render`, `write`,
`segment`); `ALFWorldFormat`, `WebShopFormat` and `ToolCallingFormat` (native tool calls through the chat template)
are `EnvironmentFormat`s, spoken in interactive environments. `segment_text(style=...)` dispatches to these objects,
and the agent loops speak through them, so what an agent writes is read back by the same rules.
"""

from .alfworld import ALFWorldFormat
from .base import AgentFormat, EnvironmentFormat, ParsedReply, ParseError, TrajectoryFormat, describe_tool, load_prompts
from .codeact import END_CODE, CodeActFormat, CodeAction, render_execution
from .react import FINISH, ReActFormat, ToolCall, ToolError
from .tool_calling import (
    TOOL_CALL_PARSERS,
    FunctionCall,
    HermesParser,
    PythonicParser,
    ToolCallingFormat,
    ToolCallParser,
    ToolCallSyntaxError,
    ToolResult,
    check_arguments,
    register_tool_call_parser,
    with_argument_dicts,
)
from .webshop import WebAction, WebShopFormat

__all__ = [
    "END_CODE",
    "FINISH",
    "TOOL_CALL_PARSERS",
    "ALFWorldFormat",
    "AgentFormat",
    "CodeActFormat",
    "EnvironmentFormat",
    "CodeAction",
    "FunctionCall",
    "HermesParser",
    "ParseError",
    "ParsedReply",
    "PythonicParser",
    "ReActFormat",
    "ToolCall",
    "ToolCallParser",
    "ToolCallSyntaxError",
    "ToolCallingFormat",
    "ToolError",
    "ToolResult",
    "TrajectoryFormat",
    "WebAction",
    "WebShopFormat",
    "check_arguments",
    "describe_tool",
    "load_prompts",
    "register_tool_call_parser",
    "with_argument_dicts",
    "render_execution",
]
