"""Data: text corpora and token blocks, instruction sets, chat formatting, SFT rows and batches."""
