"""Encoders: the bundled pretrained text encoder and the small media towers of the built-in benchmark."""
