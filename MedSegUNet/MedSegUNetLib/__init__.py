"""MedSegUNetLib: the segmentation engine behind the MedSegUNet 3D Slicer module.

Knows nothing of Slicer or Qt. Importing this package is cheap: modules that need torch, MONAI or
SimpleITK import them themselves, so the Slicer panel can read bundle metadata and run child processes
without loading torch at start-up.
"""

__version__ = "0.1.0"
