"""Inference with trained runs: reports from scans (generate), scans from reports (synthesize), explanations."""
