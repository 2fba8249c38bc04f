"""Experiment grids (configs/experiments/*.yaml) run through the training driver: data, runner, report."""
