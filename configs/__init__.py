"""Packaged configs: cluster and routing rules, sweep and ensemble specs."""
