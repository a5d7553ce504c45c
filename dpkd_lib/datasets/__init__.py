"""Data sets the study makes itself: the synthetic instruction generator."""
