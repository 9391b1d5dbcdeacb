"""Sharing a draft: the Hub (model card, push, custom_generate folder) and export for serving engines."""
