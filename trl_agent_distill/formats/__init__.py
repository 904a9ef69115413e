"""One object per agent protocol: what the agent is prompted with and writes, and what the segmenter reads.

`CodeActFormat` and `ReActFormat` are `AgentFormat`s (prompts, stop strings, `parse`, `render`, `write`,
`segment`); `ALFWorldFormat` only segments for now. `segment_text(style=...)` dispatches to these objects, and the
agent loops speak through them, so what an agent writes is read back by the same rules.
"""

from .alfworld import ALFWorldFormat
from .base import AgentFormat, EnvironmentFormat, ParsedReply, ParseError, TrajectoryFormat, describe_tool, load_prompts
from .codeact import END_CODE, CodeActFormat, CodeAction, render_execution
from .react import FINISH, ReActFormat, ToolCall, ToolError
from .webshop import WebAction, WebShopFormat

__all__ = [
    "END_CODE",
    "FINISH",
    "ALFWorldFormat",
    "AgentFormat",
    "CodeActFormat",
    "EnvironmentFormat",
    "CodeAction",
    "ParseError",
    "ParsedReply",
    "ReActFormat",
    "ToolCall",
    "ToolError",
    "TrajectoryFormat",
    "WebAction",
    "WebShopFormat",
    "describe_tool",
    "load_prompts",
    "render_execution",
]
