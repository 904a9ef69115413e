"""Environments: task worlds with tools for agents, generated locally (no download)."""

from .toy import Town, ToyTask, ToyWorld

__all__ = ["ToyTask", "ToyWorld", "Town"]
