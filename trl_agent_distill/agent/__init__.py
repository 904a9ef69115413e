"""Agent runtime: tools (retrieval, a Python sandbox), agent loops (CodeAct, ReAct) and model backends.

The protocols the loops speak (prompts, parsing, rendering, segmentation) are in `trl_agent_distill.formats`.
"""

from ..formats import describe_tool
from .backends import (
    BackendError,
    Completion,
    GenerationBackend,
    GenerationRequest,
    OpenAIBackend,
    PolicyBackend,
    SamplingParams,
    TransformersBackend,
)
from .loop import Agent, CodeActAgent, EnvironmentAgent, Episode, ReActAgent, SelfConsistency, Task
from .retrieval import PAPER_DENSE_MODEL, Document, FaissIndexConfig, RetrievalTool
from .sandbox import DEFAULT_ALLOWED_IMPORTS, Observation, PythonExecutor, PythonSandbox, SandboxError

__all__ = [
    "DEFAULT_ALLOWED_IMPORTS",
    "PAPER_DENSE_MODEL",
    "Agent",
    "BackendError",
    "CodeActAgent",
    "Completion",
    "Document",
    "EnvironmentAgent",
    "FaissIndexConfig",
    "Episode",
    "GenerationBackend",
    "GenerationRequest",
    "Observation",
    "OpenAIBackend",
    "PolicyBackend",
    "PythonExecutor",
    "PythonSandbox",
    "ReActAgent",
    "RetrievalTool",
    "SamplingParams",
    "SandboxError",
    "SelfConsistency",
    "Task",
    "TransformersBackend",
    "describe_tool",
]
