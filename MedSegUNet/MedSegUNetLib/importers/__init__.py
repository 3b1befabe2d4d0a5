"""Importers: other tools' trained models (nnU-Net v2 results, MONAI bundles) turned into MedSegUNet bundles."""
