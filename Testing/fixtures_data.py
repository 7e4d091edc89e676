"""Phantom cohort and tiny trained model fixtures (see conftest.py)."""
