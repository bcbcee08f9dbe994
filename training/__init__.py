"""Offline BoLID training (both stages) and evaluation; run through training/train.py with accelerate."""
