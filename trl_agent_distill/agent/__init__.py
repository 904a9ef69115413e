"""Agent runtime: the tools a teacher or student agent calls (retrieval, a Python sandbox)."""

from .retrieval import Document, RetrievalTool

__all__ = ["Document", "RetrievalTool"]
