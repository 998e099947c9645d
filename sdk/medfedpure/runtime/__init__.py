"""The runtime a vendor embeds: verified bundles, inference engines and the Defender.

Nothing here imports training, federation or evaluation code (checked by the import contracts).
"""
