"""Datasets: readers for each format into one common record, image loading, splits, pre-processing."""
