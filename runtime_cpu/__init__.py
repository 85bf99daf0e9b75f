"""Engines that run exported files on a CPU, and `mote-run`, the one front that picks an engine.
numpy-side only: never imports torch."""
