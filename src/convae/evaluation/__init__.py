"""Measurements of a model: reconstruction, accuracy and per-class results (``metrics``); the frozen
representation's kNN and linear probes (``probes``)."""
