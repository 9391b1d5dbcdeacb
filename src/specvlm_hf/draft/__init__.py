"""The draft model: its configuration, its forward (math only) and the elastic visual compressor."""
