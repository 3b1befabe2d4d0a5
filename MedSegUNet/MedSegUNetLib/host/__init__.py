"""For a host program (the Slicer panel): the engine's command lines, run and cancelled as child processes;
imports nothing of the engine."""
