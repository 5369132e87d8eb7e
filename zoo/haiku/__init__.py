"""Haiku (``dm-haiku``) models, to be used inside ``hk.transform``."""
