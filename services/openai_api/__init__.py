"""An OpenAI-compatible HTTP API in front of the predictor (and the trainer, for listing models)."""
