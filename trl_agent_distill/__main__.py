"""`python -m trl_agent_distill ...` (and `accelerate launch -m trl_agent_distill train ...`)."""

from .cli import main

main()
