"""The panel's helpers that need neither Qt nor MRML: text the panel shows."""
