"""The dataset store's revisions, oldest first."""
