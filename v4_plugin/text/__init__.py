"""Text: the chat encoding and effort profiles, the DSML tool-call parser, tool-choice grammars and
the offline tokenizer of tiny checkpoints."""
