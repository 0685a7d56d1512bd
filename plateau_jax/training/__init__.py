"""Training the project's own small models: corpus, tokenizer, batches."""
