"""The simulated world: entities, the ground-truth click model and the session simulator."""

from shared.world.simulator import Chunk, SessionSimulator
from shared.world.world import World

__all__ = ["Chunk", "SessionSimulator", "World"]
