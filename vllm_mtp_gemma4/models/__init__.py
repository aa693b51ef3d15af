"""The Gemma 4 MTP draft model, one file per model."""
