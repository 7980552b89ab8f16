"""Bring your own base model: a model size that starts from an existing causal LM (a directory,
an S3 prefix or a hub id) instead of being pretrained here; `base_model` imports it into the store."""
