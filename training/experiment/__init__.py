"""The CPU experiment on the synthetic-people world: world models (``world_models``), their one-time training
(``pretrain``), and the experiment itself (``run``; ``python -m training.experiment``)."""
