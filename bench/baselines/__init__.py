"""Baselines the bench compares Herald with."""
