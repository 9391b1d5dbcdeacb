"""Target adapters: where each VLM family keeps its parts (`families`), and reading the draft's inputs out of one
ordinary target forward (`features`)."""
