"""Agent runtime: the tools a teacher or student agent calls (retrieval, a Python sandbox)."""

from .retrieval import Document, RetrievalTool
from .sandbox import DEFAULT_ALLOWED_IMPORTS, Observation, PythonSandbox, SandboxError

__all__ = ["DEFAULT_ALLOWED_IMPORTS", "Document", "Observation", "PythonSandbox", "RetrievalTool", "SandboxError"]
