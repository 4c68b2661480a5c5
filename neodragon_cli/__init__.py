"""The `neodragon` command: one verb per action. It sits above the library, `train/` and `export/`."""
