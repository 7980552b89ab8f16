"""The tokenizer and the corpus as packed token ids."""
