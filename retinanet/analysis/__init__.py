"""Diagnostics: anchor coverage, anchor search, views and plots. Builds on `retinanet.model`
(its anchor generator, matcher and resizing rule); reads no files itself."""
