"""Tests that simulate several machines (see netns.py)."""
