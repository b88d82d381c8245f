"""Glue between MISA and training frameworks (Hugging Face gradient checkpointing)."""
