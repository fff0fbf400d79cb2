"""diffrl: diffusion models for decision making.

``diffrl.make``, ``diffrl.resume``, ``diffrl.distill``, ``diffrl.train_ddpo`` and ``diffrl.describe`` (from
:mod:`diffrl.api`) train agents from Python as ``diffrl train`` / ``diffrl distill`` do; they are imported on
first use, so ``import diffrl`` stays light and the core modules never import ``agents`` or ``envs``.
"""

__version__ = "0.1.0"

_API = ("Experiment", "Run", "RunSpec", "describe", "distill", "make", "resume", "train_ddpo")


def __getattr__(name: str):
    if name in _API:
        from diffrl import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
