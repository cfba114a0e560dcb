"""Dataset service: apps, datasets, inputs, uploads and immutable dataset versions."""
