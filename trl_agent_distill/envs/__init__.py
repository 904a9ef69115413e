"""Environments: task worlds with tools for agents, generated locally (no download)."""

from .toy import ToyTask, ToyWorld, Town

__all__ = ["ToyTask", "ToyWorld", "Town"]
