"""The shapes world: scenes, their captions and the strict scorer (`world`), and the built-in model's recipe and
training script (`recipe`, `train`)."""

from .world import *  # noqa: F401,F403
