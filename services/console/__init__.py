"""The web console (`loraforge-console`): the no-code workflow in a browser, over gRPC only."""
