"""Environments: worlds that answer an agent's actions (ALFWorld, BFCL, WebShop) and generated task worlds (toy).

Imported lazily: `trl_agent_distill.envs.base` is the interface; each suite brings an optional engine.
"""

import importlib

_EXPORTS = {
    "Environment": "base",
    "EnvironmentFailure": "base",
    "EnvironmentSuite": "base",
    "Transition": "base",
    "ENVIRONMENTS": "base",
    "load_environment": "base",
    "ALFWorldSuite": "alfworld",
    "ALFWorldOptions": "alfworld",
    "generate_scenes": "alfworld",
    "BFCLSuite": "bfcl",
    "BFCLOptions": "bfcl",
    "WebShopSuite": "webshop",
    "WebShopOptions": "webshop",
    "ToyTask": "toy",
    "ToyWorld": "toy",
    "Town": "toy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
