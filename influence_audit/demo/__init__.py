"""The embedded demo: a made-up corpus with planted facts and a tiny GPT-2 trained on it offline."""
