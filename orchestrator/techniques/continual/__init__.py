"""Continual learning: stages, a replay buffer of sample indices, continual evaluation.

See docs/CONTINUAL.md. ``technique`` registers the `continual:` section; ``replay`` is
the buffer, ``metrics`` the continual-evaluation metrics, ``stages`` the stage data.
"""
