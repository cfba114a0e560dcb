"""Trainer service: model types, templates, models, model versions and training workers."""
