"""Faces and images: dataset layouts, detection and alignment, corruptions, batches of tensors.

Imports only agecli's root helpers (errors, labels, progress, rundir, store)."""
