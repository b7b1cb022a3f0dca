"""Figures: every plot reads saved results (metrics logs, eval JSON), never trains."""
