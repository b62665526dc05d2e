"""ingest: validated intake of events and catalog items into the lake and the event stream."""
