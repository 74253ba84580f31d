"""The data pipeline, one stage a module, in the order data flows through them:

corpus (read text files, .jsonl or the embedded stdlib corpus) -> clean (normalise, filter)
-> dedup (exact hashes, MinHash + LSH) -> tokenizer (sentencepiece BPE/unigram/char, bytes)
-> shards (memory-mapped token files with a header) -> loader (batches of (x, y)).
``prepare`` runs the stages into a data folder; ``errors`` holds DataError.
"""
