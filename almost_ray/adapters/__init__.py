"""Decoding-time adapters: change what a model generates without training it (Hewitt et al. Section 6)."""
