"""`overfill frontier`: every configuration a user can pick, its decode cost and its quality, on one chart."""

from overfill.frontier.config import FrontierConfig
from overfill.frontier.run import run_frontier

__all__ = ["FrontierConfig", "run_frontier"]
