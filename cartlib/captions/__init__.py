"""Pseudo-captions of every item for caption enhancement (issue 14): a small learned captioner
(`model`), its word vocabulary (`text`), the caption-quality measures (`attributes`, `quality`) and
the on-disk file the `captions` stage writes (`io`)."""
