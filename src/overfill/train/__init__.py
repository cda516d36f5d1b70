"""Training: the OverFill decoder on the frozen full model's cache, and the paper's two baselines (loop.py says how)."""

from overfill.train.config import TrainConfig
from overfill.train.loop import TrainResult, train
from overfill.train.trainee import Trainee, load_trainee

__all__ = ["TrainConfig", "TrainResult", "Trainee", "load_trainee", "train"]
