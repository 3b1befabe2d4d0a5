"""What the engine does, end to end: segment, standby (the engine kept ready), evaluate; the program (cli.py)
calls these."""
