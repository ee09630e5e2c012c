"""Recipes: a YAML file that names stages and their options, checked against the stages'
real signatures before anything runs, and run step by step into one run directory."""
