"""loraforge services: dataset, trainer and predictor, and what they share."""
