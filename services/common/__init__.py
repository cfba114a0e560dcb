"""What the three services share: config, errors, server bootstrap, stores."""
