"""The `loraforge` command line."""
