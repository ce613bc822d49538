"""The command lines: flags turned into the objects the Python API takes, tables and JSON printed."""
