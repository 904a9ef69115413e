"""ALFWorld on its real engine: generated or downloaded games, one engine per episode, the planner as the oracle.

`ALFWorldSuite` is the benchmark (`load_environment("alfworld", options)`); `generate_scenes` writes games for CI and
the CPU demo; `ALFWorldEnvironment` is one episode; `ALFWorldExpert` the engine's expert as a policy.
"""

from .engine import ALFWorldEnvironment, load_engine
from .expert import ALFWorldExpert
from .scenes import TASK_TYPES, generate_scenes
from .suite import ALFWorldOptions, ALFWorldSuite

__all__ = [
    "TASK_TYPES",
    "ALFWorldEnvironment",
    "ALFWorldExpert",
    "ALFWorldOptions",
    "ALFWorldSuite",
    "generate_scenes",
    "load_engine",
]
