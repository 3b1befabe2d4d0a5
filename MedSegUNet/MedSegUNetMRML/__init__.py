"""The module's node work on Slicer's MRML alone: volume and segmentation nodes to the engine's files and
back, and annotated pairs to a scene training reads. No Qt, no ``slicer.app``, no ``slicer.util``: the same
code runs inside Slicer and on slicer-core (Slicer's MRML libraries as a wheel) in the test suite."""
