"""The HTML page of a set of trained runs, its study panels and the model card of a saved pipeline."""
