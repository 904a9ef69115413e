"""Distill tool-using LLM agents into small students: span-aware (REASON / ACT) distillation on top of TRL."""
