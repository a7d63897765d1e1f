"""The `starflow2` command line: `main.py` builds the parser, one small module per subcommand."""
