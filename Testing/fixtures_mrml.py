"""Headless MRML scene fixture (see conftest.py)."""
