"""Importers: other tools ' trained models (nnU-Net v2) turned into MedSegUNet bundles."""
