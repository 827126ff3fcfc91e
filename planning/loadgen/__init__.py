"""`hexgen bench serve`: an open-loop load generator for any OpenAI-compatible completions server."""
