"""The trainer store's revisions, oldest first."""
