"""The model, with no process management in it: the Llama stage (its layer range only, never its
pipeline rank), tensor-parallel layers bound to the group they are given, paged attention, the KV
cache, weight loading, and which ranks of adjacent stages exchange hidden states."""
