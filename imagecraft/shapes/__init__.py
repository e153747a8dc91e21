"""The shapes world (`world`), its strict scorer (`score`), and the built-in model's recipe and training
(`recipe`, `train`). `from imagecraft import shapes` gives the world's and the scorer's names directly."""

from .score import *  # noqa: F401,F403
from .world import *  # noqa: F401,F403
