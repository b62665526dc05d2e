"""traffic: simulated users playing against the running ranker and posting what they do to ingest."""
