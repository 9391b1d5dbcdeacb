"""The offline toy world (a small LLaVA target and data trained here) and what runs on it: the demo, the bench and
budget tuning. The library core never imports this package."""
