"""Evaluation: image- and patient-level metrics, bootstrap intervals, plots and report folders."""
