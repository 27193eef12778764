"""Optimisation pieces: the Nostalgia projection, regularisation penalties, EWC Fisher."""
