"""The base layer: errors, progress reports, geometry, memory, labels and whole-file writes; imports no other
part of the engine."""
