"""breastvision: train, evaluate, explain and serve breast-cancer image classifiers."""

__version__ = "0.1.0"
